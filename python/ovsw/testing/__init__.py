"""ovsw.testing: an independent float64 reference for ovsw's ops, and the comparisons.

What it is for: checking ovsw's operators (the Rust core behind ``ovsw.OvSWConv2d``,
``ovsw.OvSWLinear`` and ``ovsw.OvSW``) and a CUDA build (``python -m ovsw.cuda check``)
against sections 1-3 of the SPEC (the method as upstream runs it: the binary
convolution, AGS and SAD), written a second time in plain PyTorch ops, independently of
the core. It imports
torch and numpy only, never ``ovsw._core``, ``ovsw.ops`` or ``ovsw.nn``, so a bug in the
core cannot hide in its own reference. The tests under ``tests/`` and the CUDA self-check
take every reference value from here, as ``torch.testing`` serves torch's tests.

- :mod:`ovsw.testing.reference`: the formulas (SPEC 1-3) as functions, the oracle layers
  :class:`OracleConv2d` / :class:`OracleLinear` (:func:`to_oracle` swaps them into a
  model) and the optimizer :class:`OracleOvSW`. Each computes in the dtype it is given:
  float64 inputs make it the float64 reference.
- :mod:`ovsw.testing.compare`: comparisons that never let NaN or inf pass for a number
  (:func:`rel_err`, :func:`max_abs_err`, :func:`within`, :func:`assert_close`, ...).

>>> import torch, ovsw, ovsw.testing as ot
>>> x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
>>> w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
>>> y = ot.oracle_binary_conv2d(x, w, None, None, "ste", padding=1)  # SPEC 1.1-1.5
>>> conv = ovsw.OvSWConv2d(3, 4, 3, padding=1, dtype=torch.float64)
>>> ot.assert_close(conv(x), ot.to_oracle(conv)(x), rtol=1e-10)
"""

from .compare import (
    as_f64,
    assert_close,
    elementwise_rel_err,
    fraction_outside,
    max_abs_err,
    rel_err,
    rel_err_per_sample,
    within,
)
from .reference import (
    ACT_W,
    EPS,
    GRAD_NORM_FLOOR,
    WEIGHT_NORM_FLOOR,
    OracleConv2d,
    OracleLinear,
    OracleOvSW,
    activation_grad,
    ags_sad_layer,
    binarize_activation,
    binarize_weight,
    bireal_derivative,
    channel_abs_mean,
    channel_alpha,
    oracle_ags_sad,
    oracle_binary_conv2d,
    oracle_binary_linear,
    sample_std,
    to_oracle,
    weight_grad_mask,
)

__all__ = [
    # reference: SPEC 1-3
    "EPS",
    "GRAD_NORM_FLOOR",
    "WEIGHT_NORM_FLOOR",
    "ACT_W",
    "sample_std",
    "channel_abs_mean",
    "channel_alpha",
    "bireal_derivative",
    "binarize_activation",
    "activation_grad",
    "binarize_weight",
    "weight_grad_mask",
    "oracle_binary_conv2d",
    "OracleConv2d",
    "oracle_binary_linear",
    "OracleLinear",
    "to_oracle",
    "ags_sad_layer",
    "oracle_ags_sad",
    "OracleOvSW",
    # compare: NaN-safe comparisons
    "as_f64",
    "max_abs_err",
    "rel_err",
    "rel_err_per_sample",
    "elementwise_rel_err",
    "fraction_outside",
    "within",
    "assert_close",
]
