"""The ``torch.ops.ovsw`` custom ops (``ovsw.ops``): schemas as documented, and
``torch.library.opcheck`` (schema, fake implementation against the real one, autograd
registration, AOT dispatch) over the binarizers, scale options, modes, dtypes and
shapes; FakeTensor tracing reaches no Rust."""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ovsw
from ovsw import ops

OPS = ["binary_conv2d", "binary_conv2d_backward", "binary_linear", "binary_linear_backward"]
OPS += ["ags_sad_step"]


def _documented_schemas() -> dict[str, str]:
    text = ops.__doc__
    block = text[text.index("::\n") + 3 : text.index("\n- ")]
    schemas = {}
    for entry in re.split(r"\n(?=    ovsw::)", block.strip("\n")):
        flat = " ".join(entry.split())
        name = flat[len("ovsw::") : flat.index("(")]
        schemas[name] = flat
    return schemas


def test_schemas_are_the_documented_ones():
    documented = _documented_schemas()
    assert sorted(documented) == sorted(OPS)
    for name in OPS:
        actual = str(getattr(torch.ops.ovsw, name).default._schema)
        assert actual == documented[name], name


def _conv_args(act_w, scale, bias, training, dtype, grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 5, generator=g, dtype=dtype, requires_grad=grad)
    w = torch.randn(6, 2, 3, 3, generator=g, dtype=dtype, requires_grad=grad)
    b = torch.randn(6, generator=g, dtype=dtype, requires_grad=grad) if bias else None
    s = (torch.rand(6, generator=g, dtype=dtype) + 0.5).requires_grad_(grad) if scale else None
    return (x, w, b, s, act_w, [1, 2], [1, 0], [1, 1], 2, training, None)


def _linear_args(act_w, scale, bias, training, dtype, shape=(3, 7), grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=grad)
    w = torch.randn(5, shape[-1], generator=g, dtype=dtype, requires_grad=grad)
    b = torch.randn(5, generator=g, dtype=dtype, requires_grad=grad) if bias else None
    s = (torch.rand(5, generator=g, dtype=dtype) + 0.5).requires_grad_(grad) if scale else None
    return (x, w, b, s, act_w, training, None)


CASES = [
    ("ste", False, False, True, torch.float32),
    ("hardtanh", True, True, True, torch.float32),
    ("ste_v2", False, True, False, torch.float32),
    ("hardtanhv2", True, False, False, torch.float64),
    ("ste", True, True, True, torch.float64),
]


@pytest.mark.parametrize("act_w, scale, bias, training, dtype", CASES)
def test_opcheck_binary_conv2d(act_w, scale, bias, training, dtype):
    args = _conv_args(act_w, scale, bias, training, dtype)
    torch.library.opcheck(torch.ops.ovsw.binary_conv2d.default, args)


@pytest.mark.parametrize("act_w, scale, bias, training, dtype", CASES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 7)])
def test_opcheck_binary_linear(act_w, scale, bias, training, dtype, shape):
    args = _linear_args(act_w, scale, bias, training, dtype, shape)
    torch.library.opcheck(torch.ops.ovsw.binary_linear.default, args)


@pytest.mark.parametrize("needs", [[True, True, True, True], [False, True, False, False]])
@pytest.mark.parametrize("scale", [False, True])
def test_opcheck_backward_ops(needs, scale):
    x, w, b, s, act_w, *geometry, training, _ = _conv_args(
        "ste", scale, True, True, torch.float32, False
    )
    y, std, alpha, conv_out = torch.ops.ovsw.binary_conv2d(
        x, w, b, s, act_w, *geometry, training, None
    )
    args = (torch.randn_like(y), x, w, True, s, std, alpha, conv_out, act_w, *geometry, needs)
    torch.library.opcheck(torch.ops.ovsw.binary_conv2d_backward.default, args)
    x, w, b, s, act_w, training, _ = _linear_args(
        "hardtanh", scale, True, True, torch.float32, grad=False
    )
    y, std, alpha, product = torch.ops.ovsw.binary_linear(x, w, b, s, act_w, training, None)
    args = (torch.randn_like(y), x, w, True, s, std, alpha, product, act_w, needs)
    torch.library.opcheck(torch.ops.ovsw.binary_linear_backward.default, args)


@pytest.mark.parametrize("sad", [True])  # (NaN figures where disabled: opcheck says NaN != NaN)
def test_opcheck_ags_sad_step(sad):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 6, generator=g)]
    grads = [torch.randn(w.shape, generator=g) * 1e-3 for w in weights]
    trackers = [torch.rand(w.shape, generator=g) * 1e-3 for w in weights] if sad else []
    prevs = [w * torch.sign(torch.randn(w.shape, generator=g)) for w in weights] if sad else []
    config = ops.OvSWConfig(
        enable_ags=True,
        delta=0.05,
        enable_dampen=sad,
        dampen_weight=1e-3,
        track_momentum=0.9,
        track_threshold=1e-3,
    )
    args = (grads, weights, trackers, prevs, config)
    torch.library.opcheck(torch.ops.ovsw.ags_sad_step.default, args)


def test_absent_outputs_are_empty_markers():
    """What a call lacks comes back as a 1-D tensor of zero elements; the absent
    conv_out keeps the dtype the convolution ran in (bfloat16 under autocast)."""
    x, w, b, s, act_w, *geometry, _, _ = _conv_args(
        "ste", False, False, False, torch.float32, False
    )
    op = torch.ops.ovsw.binary_conv2d
    y, std, alpha, conv_out = op(x, w, b, s, act_w, *geometry, False, None)
    assert std.shape == (0,) and alpha.shape == (6,) and conv_out.shape == (0,)
    y, std, alpha, conv_out = op(x, w, b, s, act_w, *geometry, True, torch.bfloat16)
    assert std.shape == (2, 1, 1, 1) and conv_out.shape == (0,)
    assert conv_out.dtype == torch.bfloat16 and y.dtype == torch.float32
    # the op runs as asked, whatever autocast state surrounds it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        *_, conv_out = op(x, w, b, s, act_w, *geometry, True, None)
    assert conv_out.dtype == torch.float32


@pytest.mark.parametrize("act_w, scale, bias, training, dtype", CASES[:3])
def test_opcheck_under_autocast(act_w, scale, bias, training, dtype):
    args = _conv_args(act_w, scale, bias, training, dtype)[:-1] + (torch.bfloat16,)
    torch.library.opcheck(torch.ops.ovsw.binary_conv2d.default, args, atol=1e-2, rtol=1e-2)
    args = _linear_args(act_w, scale, bias, training, dtype)[:-1] + (torch.bfloat16,)
    torch.library.opcheck(torch.ops.ovsw.binary_linear.default, args, atol=1e-2, rtol=1e-2)


def test_fake_mode_never_reaches_rust():
    """Under FakeTensorMode the layers and their backward run on shapes only (the core
    would refuse storage-less tensors with a RuntimeError)."""
    with FakeTensorMode():
        conv = ovsw.OvSWConv2d(4, 6, 3, padding=1, scaling_factor=False)
        lin = ovsw.OvSWLinear(6, 3, bias=True)
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        h = conv(x)
        y = lin(h.mean(dim=(2, 3)))
        y.sum().backward()
        assert y.shape == (2, 3) and x.grad.shape == x.shape
        assert conv.weight.grad.shape == conv.weight.shape
        assert lin.bias.grad.shape == (3,)


@pytest.mark.parametrize("scaling_factor", [False, True])
def test_layers_under_autocast_trace_as_they_run(scaling_factor):
    """Under autocast the layers pass the autocast dtype to the op: the fake
    implementation then reports the dtypes the real op returns."""
    conv = ovsw.OvSWConv2d(4, 6, 3, padding=1, scaling_factor=scaling_factor)
    lin = ovsw.OvSWLinear(6, 3, scaling_factor=scaling_factor)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = conv(x)
        real_lin = lin(real.mean(dim=(2, 3)))
    traced = torch.export.export(_Pair(conv, lin), (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = traced.module()(x)
    torch.testing.assert_close((y, z), (real, real_lin))


class _Pair(torch.nn.Module):
    def __init__(self, conv, lin):
        super().__init__()
        self.conv, self.lin = conv, lin

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
            return y, self.lin(y.mean(dim=(2, 3)))


@pytest.mark.cuda
@pytest.mark.parametrize("act_w, scale, bias, training, dtype", CASES[:3])
def test_opcheck_on_cuda(act_w, scale, bias, training, dtype):
    def cuda(args):
        return tuple(
            a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args
        )

    torch.library.opcheck(
        torch.ops.ovsw.binary_conv2d.default, cuda(_conv_args(act_w, scale, bias, training, dtype))
    )
    torch.library.opcheck(
        torch.ops.ovsw.binary_linear.default,
        cuda(_linear_args(act_w, scale, bias, training, dtype)),
    )


@pytest.mark.cuda
def test_binary_linear_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = ovsw.OvSWLinear(40, 6, bias=True, act_w="hardtanhv2", scaling_factor=True)
    gpu = ovsw.OvSWLinear(40, 6, bias=True, act_w="hardtanhv2", scaling_factor=True).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(8, 3, 40)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    torch.testing.assert_close(yg.cpu(), yc, rtol=1e-5, atol=1e-5)
    yc.sum().backward()
    yg.sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-5, atol=1e-4)
