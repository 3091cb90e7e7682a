"""The shared comparisons (tests/numerics.py) fail on NaN and inf where a number was
expected, and measure what they say they measure."""

import math

import numpy as np
import pytest
import torch

from numerics import assert_close, elementwise_rel_err, max_abs_err, rel_err, within

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
