"""The shared comparisons (``ovsw.testing.compare``) fail on NaN and inf where a number was
expected, and measure what they say they measure."""

import math

import numpy as np
import pytest
import torch

from ovsw.testing import (
    assert_close,
    elementwise_rel_err,
    fraction_outside,
    max_abs_err,
    rel_err,
    rel_err_per_sample,
    within,
)

NONFINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", NONFINITE)
def test_a_nonfinite_answer_is_never_close(bad):
    expected = torch.tensor([1.0, 2.0, 3.0])
    actual = expected.clone()
    actual[1] = bad
    assert max_abs_err(actual, expected) == math.inf
    assert rel_err(actual, expected) == math.inf
    assert elementwise_rel_err(actual, expected, 1e-3) == math.inf
    assert not within(rel_err(actual, expected), 1e30)
    with pytest.raises(AssertionError, match="NaN or inf"):
        assert_close(actual, expected, atol=1e30)


def test_within_refuses_nan_and_inf():
    assert within(0.5, 1.0) and not within(1.5, 1.0)
    assert not within(math.nan, 1.0) and not within(math.inf, math.inf)


def test_expected_nonfinite_must_be_matched_in_place():
    expected = np.array([math.nan, 1.0, math.inf])
    assert max_abs_err(np.array([math.nan, 1.0, math.inf]), expected) == 0.0
    assert max_abs_err(np.array([0.0, 1.0, math.inf]), expected) == math.inf
    assert max_abs_err(np.array([math.nan, 1.0, -math.inf]), expected) == math.inf
    assert max_abs_err(np.array([math.nan, 1.25, math.inf]), expected) == 0.25


def test_measures():
    expected = np.array([100.0, 1.0, -0.01])
    actual = expected + np.array([0.0, 0.0, 0.001])
    assert max_abs_err(actual, expected) == pytest.approx(0.001)
    assert rel_err(actual, expected) == pytest.approx(1e-5)
    # Relative to the element itself: 10%, not 1e-5 of the largest.
    assert elementwise_rel_err(actual, expected, 1e-6) == pytest.approx(0.1)
    # The floor caps the weight of tiny elements.
    assert elementwise_rel_err(actual, expected, 1.0) == pytest.approx(0.001)
    assert rel_err(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_err(np.ones(3), np.zeros(3)) == math.inf


def test_assert_close_names_the_worst_element():
    assert_close([1.0, 2.0], [1.0, 2.0 + 1e-7], atol=1e-6)
    with pytest.raises(AssertionError, match="1 of 2 elements"):
        assert_close([1.0, 2.1], [1.0, 2.0], rtol=0.01, what="x")
    with pytest.raises(AssertionError, match="shape"):
        assert_close([1.0], [1.0, 2.0])


def test_rel_err_floor_and_per_sample():
    # The floor stands in for a tiny largest |expected|.
    assert rel_err([1e-13], [0.0], floor=1e-12) == pytest.approx(0.1)
    assert rel_err([1e-13], [0.0]) == math.inf
    assert rel_err([2.0], [1.0], floor=1e-12) == pytest.approx(1.0)
    expected = np.array([[1.0, -4.0], [0.01, 0.02], [3.0, 3.0]])
    actual = expected + np.array([[0.0, 0.04], [0.0002, 0.0], [0.0, 0.0]])
    # Each sample against its own largest |expected|: 1%, 1%, 0.
    np.testing.assert_allclose(rel_err_per_sample(actual, expected), [0.01, 0.01, 0.0])
    actual[2, 1] = math.nan
    per = rel_err_per_sample(actual, expected)
    assert per[2] == math.inf and np.isfinite(per[:2]).all()


@pytest.mark.parametrize("bad", NONFINITE)
def test_fraction_outside_counts_nonfinite_as_outside(bad):
    expected = np.zeros(10)
    actual = expected.copy()
    actual[3] = 0.5  # outside atol 1e-6
    assert fraction_outside(actual, expected, atol=1e-6) == pytest.approx(0.1)
    actual[7] = bad
    assert fraction_outside(actual, expected, atol=1e-6) == pytest.approx(0.2)
    # A non-finite expected value must be matched exactly.
    expected[7] = bad
    assert fraction_outside(actual, expected, atol=1e-6) == pytest.approx(0.1)
    assert fraction_outside(actual, expected, rtol=1.0, atol=0.5) == 0.0
