"""The export lowering bindings (``ovsw._core.deploy_*``: src/deploy/from_torch.rs and
crates/ovsw-engine/src/lower.rs) refuse bad input with a Python exception naming what is
wrong, never a panic or a crash.

What they compute is checked elsewhere: byte for byte against the numpy exporter they
replaced (tests/deploy/test_export_identity.py), against SPEC 1.3-1.5 there and in the Rust
unit tests of crates/ovsw-engine/src/lower.rs, and end to end against ``model.eval()`` in
tests/deploy/test_deploy.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ovsw import _core

W = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
K, C = np.ones(4), np.zeros(4)


BAD_CALLS = [
    (lambda: _core.deploy_pack_signs(torch.ones(3)), ValueError, "must be 4-D"),
    (
        lambda: _core.deploy_pack_signs(torch.ones(4, 3, 3, 3, dtype=torch.int32)),
        TypeError,
        "floating-point",
    ),
    (lambda: _core.deploy_pack_signs(torch.ones(4, 0, 3, 3)), ValueError, "in channels"),
    (
        lambda: _core.deploy_fold_batchnorm(torch.ones(3), torch.ones(4), None, None, 1e-5),
        ValueError,
        r"running_var must have shape \[3\]",
    ),
    (
        lambda: _core.deploy_fold_batchnorm(torch.ones(3, 1), torch.ones(3), None, None, 1e-5),
        ValueError,
        "running_mean must have one dimension",
    ),
    (
        lambda: _core.deploy_fold_batchnorm(
            torch.ones(3), torch.ones(3), torch.ones(2), None, 1e-5
        ),
        ValueError,
        r"BatchNorm weight must have shape \[3\]",
    ),
    (
        lambda: _core.deploy_fold_batchnorm(
            torch.ones(3, dtype=torch.int64), torch.ones(3), None, None, 1e-5
        ),
        TypeError,
        "floating-point",
    ),
    (
        lambda: _core.deploy_fold_conv2d(W, None, (K[:3], C[:3])),
        ValueError,
        "BatchNorm after the conv has 3 channels",
    ),
    (
        lambda: _core.deploy_fold_conv2d(W, torch.ones(5), None),
        ValueError,
        r"bias must have shape \[4\]",
    ),
    (lambda: _core.deploy_fold_conv2d(torch.ones(4, 3), None, None), ValueError, "4-D"),
    (
        lambda: _core.deploy_fold_bconv2d(W, None, None, "nope", None),
        ValueError,
        "unknown act_w 'nope'",
    ),
    (
        lambda: _core.deploy_fold_bconv2d(W, torch.ones(3), None, "ste", None),
        ValueError,
        r"scaling_factor must have shape \[4\]",
    ),
    (
        lambda: _core.deploy_fold_bconv2d(W, None, torch.ones(5), "ste_v2", None),
        ValueError,
        r"bias must have shape \[4\]",
    ),
    (
        lambda: _core.deploy_fold_bconv2d(W, None, None, "ste", (K[:2], C[:2])),
        ValueError,
        "BatchNorm that follows has 2 channels",
    ),
    (
        lambda: _core.deploy_fold_bconv2d(W, None, None, "ste", (K, C[:2])),
        ValueError,
        "as many shifts as scales",
    ),
    (
        lambda: _core.deploy_fold_bconv2d(W, None, None, "ste", (K.astype(np.float32), C)),
        TypeError,
        "bn",
    ),
    (
        lambda: _core.deploy_pack_signs(torch.ones(4, 3, 3, 3, device="meta")),
        ValueError,
        "meta tensor",
    ),
    (
        lambda: _core.deploy_fold_conv2d(torch.ones(4, 3, 3, 3, device="meta"), None, None),
        ValueError,
        "meta tensor",
    ),
]


@pytest.mark.parametrize("call,error,match", BAD_CALLS)
def test_bad_input_is_a_clear_python_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_fake_tensors_are_refused():
    with FakeTensorMode():
        w = torch.randn(4, 3, 3, 3)
        for call in (
            lambda: _core.deploy_pack_signs(w),
            lambda: _core.deploy_fold_conv2d(w, None, None),
            lambda: _core.deploy_fold_bconv2d(w, None, None, "ste", None),
            lambda: _core.deploy_fold_batchnorm(w[0, 0, 0], w[0, 0, 0], None, None, 1e-5),
        ):
            with pytest.raises(RuntimeError, match="without storage"):
                call()


def test_parameters_that_require_grad_are_read_without_a_graph():
    w = torch.nn.Parameter(W.clone())
    scale, shift = _core.deploy_fold_bconv2d(
        w, torch.nn.Parameter(torch.ones(4)), None, "ste", None
    )
    assert scale.dtype == np.float32 and scale.tolist() == [1.0] * 4
    assert shift.tolist() == [0.0] * 4
    weight, bias = _core.deploy_fold_conv2d(w, None, None)
    assert weight.shape == (4, 3, 3, 3) and bias is None
    np.testing.assert_array_equal(weight, W.permute(0, 2, 3, 1).numpy())
