"""NaN-safe comparisons of results against a reference (``ovsw.testing``'s second half).

The tests compare numbers with these functions only. Every comparison here treats NaN
and inf as wrong answers wherever the expected value is a finite number: ``NaN >= tol``
is False in Python, so a hand-written ``err <= tol`` or ``not err >= tol`` lets a NaN
through one way or the other. Here a non-finite value in ``actual`` where ``expected``
is finite makes the error ``inf``; where ``expected`` itself holds NaN or inf (a test of
NaN propagation), ``actual`` must hold the same non-finite value at the same place, and
only the finite places are measured.

Every function takes tensors (any device or dtype), numpy arrays, lists or numbers and
measures in float64 on the host. It needs numpy and torch only.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "as_f64",
    "max_abs_err",
    "rel_err",
    "rel_err_per_sample",
    "elementwise_rel_err",
    "fraction_outside",
    "within",
    "assert_close",
]


def as_f64(x) -> np.ndarray:
    """Any tensor, array, list or number as a float64 numpy array (on the host)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _pair(actual, expected) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both as float64 arrays of one shape, and whether their non-finite places agree."""
    a, e = as_f64(actual), as_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    e_bad = ~np.isfinite(e)
    same_bad = bool(
        np.array_equal(np.isnan(a[e_bad]), np.isnan(e[e_bad]))
        and np.array_equal(a[e_bad & ~np.isnan(e)], e[e_bad & ~np.isnan(e)])
        and np.isfinite(a[~e_bad]).all()
    )
    return a, e, same_bad


def max_abs_err(actual, expected) -> float:
    """max |actual - expected| over the finite places of ``expected``; ``inf`` where a
    non-finite value stands in ``actual`` and not in ``expected`` (or differs there)."""
    a, e, same_bad = _pair(actual, expected)
    if not same_bad:
        return math.inf
    ok = np.isfinite(e)
    return float(np.abs(a[ok] - e[ok]).max()) if ok.any() else 0.0


def rel_err(actual, expected, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) over the finite places of
    ``expected`` (``inf`` as in :func:`max_abs_err`; 0 for equal all-zero tensors)."""
    err = max_abs_err(actual, expected)
    e = as_f64(expected)
    finite = e[np.isfinite(e)]
    scale = max(float(np.abs(finite).max()) if finite.size else 0.0, floor)
    if err == 0.0:
        return 0.0
    return err / scale if scale > 0 else math.inf


def rel_err_per_sample(actual, expected, floor: float = 0.0) -> np.ndarray:
    """:func:`rel_err` of each sample (each index of the first axis) against that
    sample's own largest ``|expected|``, as a float64 array (``inf`` for a sample with a
    NaN or inf where a number was expected)."""
    a, e = as_f64(actual), as_f64(expected)
    assert a.shape == e.shape and a.ndim >= 1, f"shape {a.shape} != expected {e.shape}"
    return np.array([rel_err(a[i], e[i], floor) for i in range(len(e))], dtype=np.float64)


def elementwise_rel_err(actual, expected, floor: float) -> float:
    """max over elements of |actual - expected| / max(|expected|, floor): an error in a
    small element counts against that element, not against the tensor's largest."""
    assert floor > 0, "the floor must be positive"
    a, e, same_bad = _pair(actual, expected)
    if not same_bad:
        return math.inf
    ok = np.isfinite(e)
    if not ok.any():
        return 0.0
    return float((np.abs(a[ok] - e[ok]) / np.maximum(np.abs(e[ok]), floor)).max())


def fraction_outside(actual, expected, *, atol: float = 0.0, rtol: float = 0.0) -> float:
    """The fraction of elements with |actual - expected| > atol + rtol * |expected|,
    where a NaN or inf in ``actual`` not matched in ``expected`` counts as outside."""
    a, e = as_f64(actual), as_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    if e.size == 0:
        return 0.0
    with np.errstate(invalid="ignore"):
        inside = np.abs(a - e) <= atol + rtol * np.abs(e)
    e_bad = ~np.isfinite(e)
    same = (np.isnan(a) & np.isnan(e)) | (a == e)
    inside = np.where(e_bad, same, inside)
    return float((~inside).mean())


def within(err: float, tol: float) -> bool:
    """``err <= tol`` for a finite ``err`` only: NaN and inf are never within."""
    return math.isfinite(err) and err <= tol


def assert_close(actual, expected, *, atol: float = 0.0, rtol: float = 0.0, what: str = ""):
    """|actual - expected| <= atol + rtol * |expected| at every element, NaN and inf
    failing as in :func:`max_abs_err`."""
    a, e, same_bad = _pair(actual, expected)
    label = f"{what}: " if what else ""
    assert same_bad, f"{label}NaN or inf where a number was expected (or a different one)"
    ok = np.isfinite(e)
    excess = np.abs(a[ok] - e[ok]) - (atol + rtol * np.abs(e[ok]))
    if excess.size and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{label}{int((excess > 0).sum())} of {excess.size} elements out of "
            f"atol={atol:g} rtol={rtol:g}; worst |{a[ok][i]!r} - {e[ok][i]!r}|"
        )
