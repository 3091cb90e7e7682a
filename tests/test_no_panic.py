"""No Rust panic reaches Python (issue 9): the layers trace through their
``torch.library`` ops (issue 13: torch.export and FakeTensorMode run the fake
implementations, never Rust), ``_core`` called directly with tensors without storage
gives a clear RuntimeError, meta tensors take the generic route, and ``_core`` called
directly with bad shapes gives ValueError (or TypeError for a wrong dtype).

A Rust panic surfaces as ``pyo3_runtime.PanicException``, a ``BaseException``: neither
``pytest.raises(RuntimeError)`` nor ``pytest.raises(ValueError)`` would catch it, so
each check below fails on a panic. The boundary that turns a panic into a RuntimeError
is tested in Rust (src/error.rs), where a panic can be raised on purpose.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ovsw
from ovsw import _core

NO_STORAGE = "without storage"


def spec(act_w="ste"):
    return _core.ConvSpec(act_w=act_w)


def geometry():
    return ([1, 1], [1, 1], [1, 1], 1)


def forward(x, weight, bias=None, scale=None, training=True, act_w="ste"):
    return _core.binary_conv2d_forward(x, weight, bias, scale, act_w, *geometry(), training)


ABSENT = torch.empty(0)


def good_forward(n=2, c=3, o=4, training=True, scale=False):
    torch.manual_seed(0)
    x = torch.randn(n, c, 5, 5)
    w = torch.randn(o, c, 3, 3)
    s = torch.rand(o) + 0.5 if scale else None
    y, std, alpha, conv_out = forward(x, w, scale=s, training=training)
    return dict(
        grad_y=torch.randn_like(y),
        x=x,
        weight=w,
        has_bias=False,
        scale=s,
        std=std,
        alpha=alpha,
        conv_out=conv_out,
    )


def backward(saved, needs=(True, True, False, True), act_w="ste"):
    return _core.binary_conv2d_backward(
        saved["grad_y"],
        saved["x"],
        saved["weight"],
        saved["has_bias"],
        saved["scale"],
        saved["std"],
        saved["alpha"],
        saved["conv_out"],
        act_w,
        *geometry(),
        needs,
    )


# -- tensors without storage ---------------------------------------------------------------
def test_torch_export_of_a_layer_works():
    """What gave a RuntimeError before the ops were registered (and a Rust panic before
    that) now exports: the program calls the op, and runs like the layer."""
    torch.manual_seed(0)
    layer = ovsw.OvSWConv2d(4, 4, 3).eval()
    x = torch.randn(1, 4, 8, 8)
    program = torch.export.export(layer, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.ovsw.binary_conv2d.default in targets
    torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_fake_tensor_mode_forward_and_backward(training):
    with FakeTensorMode():
        layer = ovsw.OvSWConv2d(4, 4, 3).train(training)
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        y = layer(x)
        y.sum().backward()
    assert y.shape == (2, 4, 6, 6) and x.grad.shape == x.shape
    assert layer.weight.grad.shape == layer.weight.shape


def test_direct_core_call_with_a_fake_tensor_is_a_runtime_error():
    with FakeTensorMode():
        x = torch.randn(2, 4, 8, 8)
        w = torch.randn(4, 4, 3, 3)
        with pytest.raises(RuntimeError, match=NO_STORAGE) as info:
            forward(x, w)
    assert isinstance(info.value, Exception)  # what `except Exception` catches
    assert "torch.ops.ovsw" in str(info.value)


def test_fake_tensor_error_after_an_earlier_torch_warning():
    """torch re-raises C++ warnings when a call returns; one raised by the core while it
    refuses a FakeTensor turned the RuntimeError into a SystemError once the process
    had shown a warning before (as here)."""
    # One weight per channel: var() warns. The constructor refuses that layer unless it
    # is made on the meta device (then not checked).
    conv = ovsw.OvSWConv2d(2, 4, 1, groups=2, device="meta").to_empty(device="cpu")
    torch.nn.init.normal_(conv.weight)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        conv(torch.randn(2, 2, 4, 4))
        assert any("degrees of freedom" in str(w.message) for w in seen)
        with FakeTensorMode():
            x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3)
            with pytest.raises(RuntimeError, match=NO_STORAGE):
                forward(x, w)


def test_fake_tensor_mode_direct_core_calls():
    with FakeTensorMode():
        w = torch.randn(4, 3, 3, 3)
        g = torch.randn(4, 3, 3, 3)
        cfg = _core.OvSWConfig(enable_ags=True)
        for call in (
            lambda: _core.channel_abs_mean(w),
            lambda: _core.channel_alpha(w),
            lambda: _core.binarize_weight(w, spec()),
            lambda: _core.sad_initial_state(w, False),
            lambda: _core.ags_sad_step(cfg, [g], [w], [None], [None]),
        ):
            with pytest.raises(RuntimeError, match=NO_STORAGE):
                call()


def test_fake_tensors_made_by_a_mode_outside_it():
    mode = FakeTensorMode()
    with mode:
        x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match=NO_STORAGE):
        forward(x, w)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling_factor", [False, True])
def test_meta_tensors_run_on_shapes(training, scaling_factor):
    """Meta tensors have shapes but no elements: a layer on them runs the ops' meta
    (fake) implementations; the core called directly takes its generic route."""
    layer = ovsw.OvSWConv2d(4, 6, 3, padding=1, device="meta", scaling_factor=False)
    if scaling_factor:
        layer.scaling_factor = torch.nn.Parameter(torch.ones(6, device="meta"))
    layer.train(training)
    x = torch.randn(2, 4, 7, 7, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == (2, 6, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"
    assert layer.weight.grad.shape == layer.weight.shape
    if scaling_factor:
        assert layer.scaling_factor.grad.shape == (6,)
    scale = layer.scaling_factor.detach() if scaling_factor else None
    x = x.detach()
    y, std, alpha, conv_out = _core.binary_conv2d_forward(
        x, layer.weight.detach(), None, scale, "ste", [1, 1], [1, 1], [1, 1], 1, training
    )
    assert y.device.type == "meta" and y.shape == (2, 6, 7, 7)
    assert std.shape == ((2, 1, 1, 1) if training else (0,))
    grads = _core.binary_conv2d_backward(
        torch.ones_like(y),
        x,
        layer.weight.detach(),
        False,
        scale,
        std,
        alpha,
        conv_out,
        "ste",
        [1, 1],
        [1, 1],
        [1, 1],
        1,
        [True, True, False, scaling_factor],
    )
    assert grads[0].shape == x.shape and grads[1].shape == layer.weight.shape


# -- _core called directly with bad shapes --------------------------------------------------
def test_forward_with_a_0d_weight():
    with pytest.raises(ValueError, match="weight must be 4-D"):
        forward(torch.randn(2, 3, 5, 5), torch.tensor(1.0))


def test_forward_with_a_0d_input():
    with pytest.raises(ValueError, match="4-D input"):
        forward(torch.tensor(1.0), torch.randn(4, 3, 3, 3))


@pytest.mark.parametrize("scale", [torch.tensor(1.0), torch.ones(3), torch.ones(4, 1)])
def test_forward_with_a_bad_scale(scale):
    with pytest.raises(ValueError, match=r"scaling_factor must have shape \[4\]"):
        forward(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), scale=scale)


def test_forward_with_a_0d_bias():
    with pytest.raises(ValueError, match=r"bias must have shape \[4\]"):
        forward(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), bias=torch.tensor(0.0))


def test_forward_with_a_sparse_input():
    x = torch.randn(2, 3, 5, 5).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        forward(x, torch.randn(4, 3, 3, 3))


def test_forward_with_an_empty_batch():
    y, std, *_ = forward(torch.randn(0, 3, 5, 5), torch.randn(4, 3, 3, 3))
    assert y.shape == (0, 4, 5, 5) and std.shape == (0, 1, 1, 1)


def test_absent_markers_and_a_bad_act_w():
    y, std, alpha, conv_out = forward(
        torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), training=False
    )
    assert std.shape == (0,) and alpha.shape == (4,) and conv_out.shape == (0,)
    with pytest.raises(ValueError, match="unknown act_w 'sgn'"):
        forward(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), act_w="sgn")


def test_a_libtorch_refusal_is_a_runtime_error():
    # a 3x3 kernel on a 1x1 input without padding: libtorch's own error
    with pytest.raises(RuntimeError, match="libtorch"):
        _core.binary_conv2d_forward(
            torch.randn(1, 3, 1, 1),
            torch.randn(4, 3, 3, 3),
            None,
            None,
            "ste",
            [1, 1],
            [0, 0],
            [1, 1],
            1,
            True,
        )


def test_backward_sanity():
    grads = backward(good_forward())
    assert grads[0].shape == (2, 3, 5, 5) and grads[1].shape == (4, 3, 3, 3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("x", torch.tensor(1.0), "x must be 4-D"),
        ("x", torch.randn(2, 3, 5), "x must be 4-D"),
        ("weight", torch.tensor(1.0), "weight must be 4-D"),
        ("grad_y", torch.tensor(1.0), "grad_output has shape"),
        ("grad_y", torch.randn(3, 4, 5, 5), "grad_output has shape"),
        ("grad_y", torch.randn(2, 5, 5, 5), "grad_output has shape"),
        ("grad_y", torch.randn(2, 4, 5), "grad_output has shape"),
        ("std", torch.tensor(1.0), "std must have shape"),
        ("std", torch.ones(3, 1, 1, 1), "std must have shape"),
        ("alpha", torch.tensor(1.0), r"alpha must have shape \[4\]"),
        ("alpha", torch.ones(5), r"alpha must have shape \[4\]"),
        ("alpha", torch.ones(1, 0), r"alpha must have shape \[4\]"),
    ],
)
def test_backward_with_bad_shapes(field, value, match):
    saved = good_forward()
    saved[field] = value
    with pytest.raises(ValueError, match=match):
        backward(saved)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("scale", torch.tensor(1.0), r"scaling_factor must have shape \[4\]"),
        ("conv_out", torch.tensor(1.0), "conv_out has shape"),
        ("conv_out", torch.randn(2, 4, 5, 4), "conv_out has shape"),
    ],
)
def test_backward_with_a_bad_learnable_scale(field, value, match):
    saved = good_forward(scale=True)
    saved[field] = value
    with pytest.raises(ValueError, match=match):
        backward(saved)


def test_backward_without_any_scale():
    saved = good_forward()
    saved["alpha"] = ABSENT
    with pytest.raises(ValueError, match="scaling_factor or alpha"):
        backward(saved)


def test_backward_with_an_integer_gradient():
    saved = good_forward()
    saved["grad_y"] = torch.ones(2, 4, 5, 5, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        backward(saved)


@pytest.mark.parametrize("weight", [torch.tensor(1.0), torch.ones(4)])
@pytest.mark.parametrize(
    "call",
    [
        _core.channel_abs_mean,
        _core.channel_alpha,
        lambda w: _core.binarize_weight(w, spec("ste")),
        lambda w: _core.binarize_weight(w, spec("ste_v2")),
    ],
)
def test_weight_functions_with_too_few_dims(call, weight):
    with pytest.raises(ValueError, match="output-channel dimension"):
        call(weight)


def test_weight_functions_with_an_integer_weight():
    with pytest.raises(TypeError, match="floating-point"):
        _core.channel_alpha(torch.ones(4, 3, 3, 3, dtype=torch.int32))


def test_sad_initial_state_with_a_0d_weight():
    with pytest.raises(ValueError, match="output-channel dimension"):
        _core.sad_initial_state(torch.tensor(1.0), False)


def _layer(o=4):
    w = torch.randn(o, 3, 3, 3)
    g = torch.randn_like(w)
    t, p = _core.sad_initial_state(w, False)
    return g, w, t, p


SAD = dict(enable_ags=True, enable_dampen=True, dampen_weight=1e-3)


@pytest.mark.parametrize(
    "lists, match",
    [
        ((1, 2, 2, 2), "got 1 grads, 2 weights"),
        ((2, 2, 1, 2), "1 trackers"),
        ((2, 2, 2, 0), "0 weight_prevs"),
    ],
)
def test_ags_sad_step_with_mismatched_list_lengths(lists, match):
    layers = [_layer(), _layer()]
    columns = list(zip(*layers))
    args = [list(col[:k]) for col, k in zip(columns, lists)]
    with pytest.raises(ValueError, match=match):
        _core.ags_sad_step(_core.OvSWConfig(**SAD), *args)


@pytest.mark.parametrize(
    "index, value, match",
    [
        (0, torch.tensor(1.0), "grad has shape"),
        (0, torch.randn(4, 3, 3), "grad has shape"),
        (1, torch.tensor(1.0), "output-channel dimension"),
        (2, torch.zeros(3), "tracker has shape"),
        (3, torch.tensor(0.0), "weight_prev has shape"),
    ],
)
def test_ags_sad_step_with_bad_shapes(index, value, match):
    layer = list(_layer())
    layer[index] = value
    g, w, t, p = layer
    with pytest.raises(ValueError, match=match):
        _core.ags_sad_step(_core.OvSWConfig(**SAD), [g], [w], [t], [p])


def test_ags_sad_step_with_sad_enabled_and_no_buffers():
    g, w, _, _ = _layer()
    with pytest.raises(ValueError, match="no tracker/weight_prev"):
        _core.ags_sad_step(_core.OvSWConfig(**SAD), [g], [w], [None], [None])


def test_ags_sad_step_with_an_integer_weight():
    w = torch.ones(4, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating-point"):
        _core.ags_sad_step(_core.OvSWConfig(enable_ags=True), [w], [w], [None], [None])
