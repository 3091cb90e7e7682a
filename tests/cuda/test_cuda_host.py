"""The fused CUDA route run on the CPU through the host launcher (src/cuda/host.rs): the
kernels of ``binconv.cu`` and ``ags_sad.cu``, compiled for the CPU from the same source
and launched by the same Rust launch code as on a GPU, against the CPU route. No GPU
needed: these tests run in CI.

- float32: the fused route equals the CPU route within 1e-5 of each tensor's largest
  magnitude (NaN and inf where the CPU route has them, nowhere else).
- float16 and bfloat16 (and AMP's float32 weights with float16/bfloat16 activations):
  against the float64 oracle (``ovsw.testing``) on the same rounded operands, within
  bounds derived from the formats' rounding (:func:`within_rounding` says how); each
  bound is shown to reject a planted error just beyond it.

Every case checks, through the route counters, that the fused kernels ran (and were not
declined) on the host-launcher run.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovsw import _core, ops, testing
from ovsw.testing import as_f64, rel_err, within

FP32_TOL = 1e-5


@pytest.fixture
def host():
    """The host launcher selected for the test, the previous selection restored after."""
    was = _core.cuda_host_launcher()
    _core.cuda_set_host_launcher(True)
    yield
    _core.cuda_set_host_launcher(was)


@contextlib.contextmanager
def route(host_on: bool, *ops_fused: str):
    """Runs the block with the host launcher on or off; with it on, each op named must
    take the fused route (counted fused, never declined) at least once."""
    was = _core.cuda_host_launcher()
    _core.cuda_set_host_launcher(host_on)
    before = _core.cuda_route_counts()
    try:
        yield
    finally:
        _core.cuda_set_host_launcher(was)
    after = _core.cuda_route_counts()
    for op in ops_fused:
        fused = after[op]["fused"] - before[op]["fused"]
        declined = after[op]["declined"] - before[op]["declined"]
        assert fused > 0 and declined == 0, (op, after[op])
    if not host_on:
        assert after == before  # CPU tensors never reach the CUDA route


# ---------------------------------------------------------------------------------------
# The binary convolution
# ---------------------------------------------------------------------------------------
def run_conv(x, w, b, s, act_w, geo, g, training=True, amp=None):
    """``ovsw::binary_conv2d`` forward (under CPU autocast to ``amp`` if given) and its
    backward with output gradient ``g``: a dict of every output and gradient."""
    leaves = [
        t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, s)
    ]
    xl, wl, bl, sl = leaves
    ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        y, std, alpha, conv_out = torch.ops.ovsw.binary_conv2d(
            xl, wl, bl, sl, act_w, *geo, training, ops.autocast_dtype(xl)
        )
    out = {"y": y, "std": std, "alpha": alpha, "conv_out": conv_out}
    names = ["gx", "gw", "gb", "gs"]
    present = [(n, t) for n, t in zip(names, leaves) if t is not None]
    grads = torch.autograd.grad(y, [t for _, t in present], g.to(y.dtype))
    out.update({n: gr for (n, _), gr in zip(present, grads)})
    return out


def geometry(stride=1, padding=0, dilation=1, groups=1):
    p = lambda v: [v, v]  # noqa: E731
    return (p(stride), p(padding), p(dilation), groups)


def conv_inputs(n, c, h, wd, o, k, groups=1, bias=False, learnable=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=gen) * 1.3 + 0.2
    w = torch.randn(o, c // groups, k, k, generator=gen) * 0.4
    b = torch.randn(o, generator=gen) * 0.5 if bias else None
    s = (torch.rand(o, generator=gen) + 0.25) if learnable else None
    return x, w, b, s


def output_grad(y_shape, seed=1):
    return torch.randn(y_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# Each case: (name, inputs kwargs, act_w, geometry kwargs, channels_last).
CONV_CASES = [
    # 19,200 elements per sample: two moment chunks (of at most 16,384), three sign
    # blocks (of 8,192); computed alpha folded with a bias.
    (
        "two_chunks_bias",
        dict(n=2, c=3, h=80, wd=80, o=4, k=3, bias=True),
        "ste",
        dict(padding=1),
        False,
    ),
    # 32 x 3 x 3 = 288 weights per channel (more than a block's 256 threads), learnable
    # scale, no bias.
    (
        "wide_channel_learnable",
        dict(n=2, c=32, h=5, wd=5, o=6, k=3, learnable=True),
        "hardtanh",
        dict(padding=1),
        False,
    ),
    # 1x1 stride 2, channels_last, bias, ste_v2.
    (
        "1x1_stride2_channels_last",
        dict(n=3, c=8, h=9, wd=7, o=5, k=1, bias=True),
        "ste_v2",
        dict(stride=2),
        True,
    ),
    # dilated, grouped, learnable scale, channels_last, hardtanhv2.
    (
        "dilated_grouped_learnable",
        dict(n=2, c=6, h=11, wd=10, o=4, k=3, groups=2, learnable=True),
        "hardtanhv2",
        dict(padding=2, dilation=2, groups=2),
        True,
    ),
]


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _case_tensors(case, dtype=torch.float32):
    name, kw, act_w, gk, cl = case
    x, w, b, s = conv_inputs(**kw)
    x = _layout(x.to(dtype), cl)
    w = _layout(w.to(dtype), cl)
    b = b.to(dtype) if b is not None else None
    s = s.to(dtype) if s is not None else None
    geo = geometry(**gk)
    return x, w, b, s, act_w, geo


def _y_shape(x, w, geo):
    return F.conv2d(x[:, :, :, :].float(), w.float(), None, *geo).shape


def assert_routes_equal(fused, cpu, tol=FP32_TOL, finite=True):
    """Every output of the fused run equals the CPU route's within ``tol`` relative (NaN
    and inf where the CPU route has them), shapes and dtypes the same; with ``finite``
    the CPU route's outputs must be finite (so that no comparison passes NaN for NaN)."""
    assert fused.keys() == cpu.keys()
    for k in cpu:
        f, c = fused[k], cpu[k]
        assert not finite or torch.isfinite(c).all(), k
        assert f.shape == c.shape and f.dtype == c.dtype, (k, f.shape, c.shape, f.dtype, c.dtype)
        err = rel_err(f, c, floor=1e-30)
        assert within(err, tol), (k, err)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_float32_equals_the_cpu_route(host, case):
    x, w, b, s, act_w, geo = _case_tensors(case)
    g = output_grad(_y_shape(x, w, geo))
    with route(True, "conv_forward", "conv_backward"):
        fused = run_conv(x, w, b, s, act_w, geo, g)
    with route(False):
        cpu = run_conv(x, w, b, s, act_w, geo, g)
    assert_routes_equal(fused, cpu)
    if case[-1]:
        assert fused["y"].is_contiguous(memory_format=torch.channels_last)
        assert fused["gx"].stride() == x.stride()
    # The comparison refuses a wrong answer: one element of y off by 2e-5 of its scale.
    planted = fused["y"].detach().contiguous().clone()
    planted.view(-1)[3] += 2e-5 * planted.abs().max()
    assert not within(rel_err(planted, cpu["y"], floor=1e-30), FP32_TOL)


ACT_W_SCALE = [("ste", False), ("hardtanh", True), ("ste_v2", True), ("hardtanhv2", False)]
assert {a for a, _ in ACT_W_SCALE} == set(testing.ACT_W)


@pytest.mark.parametrize("act_w, learnable", ACT_W_SCALE)
def test_conv_float32_every_act_w_train_and_eval(host, act_w, learnable):
    """All four ``act_w``, each scale kind twice (the bias with the computed one),
    training and eval (no std: ``sign(x)``), zero weights in one channel (alpha 0 or,
    for ste_v2, w_b 0) and exact zeros in x."""
    x, w, b, s = conv_inputs(2, 4, 6, 6, 5, 3, bias=not learnable, learnable=learnable, seed=3)
    w[2] = 0.0
    x[0, 1, 2] = 0.0
    geo = geometry(padding=1)
    g = output_grad(_y_shape(x, w, geo), seed=4)
    for training in (True, False):
        with route(True, "conv_forward", "conv_backward"):
            fused = run_conv(x, w, b, s, act_w, geo, g, training=training)
        with route(False):
            cpu = run_conv(x, w, b, s, act_w, geo, g, training=training)
        assert_routes_equal(fused, cpu)


@pytest.mark.parametrize("training", [True, False])
def test_conv_nan_and_inf_inputs_follow_the_cpu_route(host, training):
    """NaN and inf in x and W: sign(nan) = 0 as torch.sign; the CPU route is the
    reference, NaN for NaN and inf for inf at the same places."""
    x, w, b, s = conv_inputs(3, 4, 5, 5, 4, 3, bias=True, seed=5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 3] = float("inf")
    x[2, 3, 4, 4] = -float("inf")
    w[1, 0, 1, 1] = float("nan")
    w[3, 2, 0, 0] = float("inf")
    geo = geometry(padding=1)
    g = output_grad(_y_shape(torch.zeros_like(x), torch.zeros_like(w), geo), seed=6)
    with route(True, "conv_forward", "conv_backward"):
        fused = run_conv(x, w, b, None, "hardtanh", geo, g, training=training)
    with route(False):
        cpu = run_conv(x, w, b, None, "hardtanh", geo, g, training=training)
    assert torch.isnan(cpu["y"]).any()  # the case reaches NaN outputs at all
    assert_routes_equal(fused, cpu, finite=False)
    # sign(nan) = 0: the channels with finite weights stay finite on every sample
    # (eval: the NaN element counts 0; training: the sample's std is NaN, its a all 0).
    assert torch.isfinite(fused["y"][:, [0, 2]]).all()


def test_conv_empty_batch(host):
    """An empty training batch: y ``[0, O, H, W]``, std ``[0, 1, 1, 1]`` (as the fake
    and the CPU route give), zero weight gradients, on both routes."""
    x, w, b, s = conv_inputs(0, 4, 5, 5, 3, 3, learnable=True)
    geo = geometry(padding=1)
    g = torch.zeros(0, 3, 5, 5, dtype=torch.float64)
    with route(True, "conv_forward", "conv_backward"):
        fused = run_conv(x, w, b, s, "ste", geo, g)
    with route(False):
        cpu = run_conv(x, w, b, s, "ste", geo, g)
    assert fused["std"].shape == cpu["std"].shape == (0, 1, 1, 1)
    assert_routes_equal(fused, cpu)
    assert torch.equal(fused["gw"], torch.zeros_like(w))


def test_conv_learnable_scale_keeps_conv_out_on_every_route(host):
    """A learnable scale without a bias: ``conv_out`` (``[N, O, H, W]``, the product
    before scaling) on the fused route as on the CPU route and in the fake
    implementation, which Inductor and opcheck hold the real op to."""
    x, w, b, s = conv_inputs(2, 3, 6, 6, 4, 3, learnable=True, seed=7)
    geo = geometry(padding=1)
    g = output_grad((2, 4, 6, 6), seed=8)
    with route(True, "conv_forward"):
        fused = run_conv(x, w, b, s, "ste", geo, g)
    with route(False):
        cpu = run_conv(x, w, b, s, "ste", geo, g)
    assert fused["conv_out"].shape == (2, 4, 6, 6)
    assert_routes_equal(fused, cpu)


@pytest.mark.parametrize("case", ["learnable_no_bias", "empty_batch"])
def test_opcheck_on_the_host_launcher(host, case):
    """``torch.library.opcheck`` (fake against real, autograd, AOT dispatch) with the
    fused route running the op."""
    n = 0 if case == "empty_batch" else 2
    x, w, b, s = conv_inputs(n, 4, 6, 5, 6, 3, groups=2, learnable=True, seed=9)
    args = (x.requires_grad_(), w.requires_grad_(), None, s.requires_grad_(), "hardtanh")
    args += ([1, 2], [1, 0], [1, 1], 2, True, None)
    before = _core.cuda_route_counts()["conv_forward"]["fused"]
    torch.library.opcheck(torch.ops.ovsw.binary_conv2d.default, args)
    assert _core.cuda_route_counts()["conv_forward"]["fused"] > before


@pytest.mark.slow
def test_conv_at_the_moment_chunk_cap(host):
    """Samples of 1,053,690 elements: 65 chunks of 16,384 would be needed, the launch
    caps them at 64 (larger chunks, the last one shorter); std and the layer still
    equal the CPU route."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 2, 1023, 515, generator=gen)
    x[0] = x[0] * 0.5 + 3.0  # a mean far from 0 makes a lost chunk show in the std
    x[1, 1, -8:] += 40.0  # ... and so does a tail a wrong chunk split would drop
    w = torch.tensor([[[[0.7]], [[0.1]]], [[[-0.2]], [[0.4]]]])  # two weights a channel
    g = output_grad((2, 2, 1023, 515), seed=11)
    with route(True, "conv_forward", "conv_backward"):
        fused = run_conv(x, w, None, None, "ste", geometry(), g)
    with route(False):
        cpu = run_conv(x, w, None, None, "ste", geometry(), g)
    assert_routes_equal(fused, cpu)
    # The case is sensitive: leaving out the last 16,000 elements (most of the last
    # chunk) moves the std of sample 1 far beyond the tolerance.
    flat = x[1].reshape(-1).double()
    short = (flat[:-16000].var() + 1e-5).sqrt()
    assert not within(rel_err(short, cpu["std"][1].reshape(())), FP32_TOL)


# ---------------------------------------------------------------------------------------
# float16 and bfloat16 against the float64 oracle
# ---------------------------------------------------------------------------------------
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
F32_U = 2.0**-24


def within_rounding(got, ref, mass, eps):
    """The largest ``|got - ref| / (eps * mass)`` over the elements (``inf`` for a NaN or
    inf in ``got``): at most 1 when every element is within its bound.

    The bounds. Each output is a sum of products of the rounded operands; ``mass`` is
    the same sum over their absolute values, computed in float64 (:func:`conv_masses`).
    A rounding step in the low-precision format changes a value ``v`` by at most
    ``u |v|`` (u, the unit roundoff: 2^-11 for float16, 2^-8 for bfloat16), and one
    rounding of every term of a sum, or of the sum, changes it by at most ``u`` times its
    mass; a sum of ``n`` terms accumulated in the format with a rounding after each
    addition, by at most ``(n - 1) u`` times its mass (first order). Float32 steps cost
    2^-24 each. So ``|got - ref| <= eps * mass`` with ``eps`` = (steps) x u + (float32
    steps) x 2^-24, the steps counted per output where the bound is formed
    (:func:`conv_eps`). No sqrt(n) (probabilistic) argument is used: the bounds hold for
    any rounding pattern.
    """
    g, r, m = as_f64(got), as_f64(ref), as_f64(mass)
    assert g.shape == r.shape == m.shape
    assert np.isfinite(r).all() and np.isfinite(m).all()
    if not np.isfinite(g).all():
        return float("inf")
    bound = eps * m + 1e-300
    return float((np.abs(g - r) / bound).max()) if g.size else 0.0


def assert_within_rounding(got, ref, mass, eps, what):
    ratio = within_rounding(got, ref, mass, eps)
    assert ratio <= 1.0, f"{what}: error {ratio:.3g} x its rounding bound"
    # A planted error just beyond the bound (1.05 x) at the element with the largest
    # mass is refused.
    planted = as_f64(ref).copy()
    i = np.unravel_index(np.argmax(as_f64(mass)), planted.shape)
    planted[i] += 1.05 * eps * as_f64(mass)[i]
    assert within_rounding(planted, ref, mass, eps) > 1.0, what
    return ratio


def libtorch_sums_in_float32(dtype, which):
    """Whether libtorch's CPU convolution in ``dtype`` forms the sums of ``which`` pass
    (``"forward"``, ``"input"``, ``"weight"`` or ``"bias"`` gradient) in float32 and
    rounds once: 3,000 products of ones come out as 3,000 rounded once to ``dtype`` (a
    sum rounded after every addition stops at 256 in bfloat16 and 2,048 in float16).
    Evidence, not proof, of how the sum is formed; where it fails (the weight gradient
    summed over a batch does, with the torch 2.x CPU kernels) the bound takes the worst
    case instead."""
    n = 3000
    one = torch.ones((), dtype=dtype)
    if which == "forward":
        got = F.conv2d(one.expand(1, n, 1, 1), one.expand(1, n, 1, 1))
    elif which == "input":
        x = one.expand(1, 1, 1, 1).clone().requires_grad_()
        y = F.conv2d(x, one.expand(n, 1, 1, 1))
        (got,) = torch.autograd.grad(y, x, torch.ones_like(y))
    else:
        x = one.expand(n, 1, 1, 1)
        w = one.expand(1, 1, 1, 1).clone().requires_grad_()
        b = one.expand(1).clone().requires_grad_()
        y = F.conv2d(x, w, b)
        got = torch.autograd.grad(y, w if which == "weight" else b, torch.ones_like(y))[0]
    return got.item() == torch.tensor(float(n)).to(dtype).item()


def conv_masses(x, w, b, s, act_w, geo, g, training):
    """The float64 oracle's outputs on the rounded operands ``(x, w, b, s, g)``, and the
    mass of each (the same computation over absolute values; see
    :func:`within_rounding`). ``s`` None: alpha from W."""
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    sd = s.detach().double().requires_grad_() if s is not None else None
    gd = g.double()
    y = testing.oracle_binary_conv2d(xd, wd, bd, sd, act_w, *geo, training)
    leaves = [t for t in (xd, wd, bd, sd) if t is not None]
    grads = torch.autograd.grad(y, leaves, gd)
    spread = zip(["gx", "gw", "gb", "gs"], _spread(grads, b, s))
    ref = {"y": y.detach(), **{k: v for k, v in spread if v is not None}}
    with torch.no_grad():
        if training:
            std = testing.sample_std(xd)
            ref["std"] = std
        else:
            std = torch.ones(1, dtype=torch.float64)
        xh = xd / std
        alpha = testing.channel_alpha(wd)
        if s is None:
            ref["alpha"] = alpha
    a_abs = xh.detach().sign().abs().requires_grad_()
    wb_abs = testing.binarize_weight(wd.detach(), act_w).abs().requires_grad_()
    s_abs = (sd if sd is not None else alpha).detach().abs().requires_grad_()
    b_abs = bd.detach().abs().requires_grad_() if bd is not None else None
    conv = F.conv2d(a_abs, wb_abs, b_abs, *geo)
    y_abs = conv * s_abs[None, :, None, None]
    abs_leaves = [t for t in (a_abs, wb_abs, b_abs, s_abs) if t is not None]
    d = torch.autograd.grad(y_abs, abs_leaves, gd.abs())
    d_a, d_wb = d[0], d[1]
    d_b = d[2] if b is not None else None
    d_s = d[-1]
    u = 1.0  # the factor's own error is counted in conv_eps; here its reach
    factor = (2 - 2 * xh.abs()).clamp_min(0) + 2 * xh.abs() * (xh.abs() < 1.01) * u
    mass = {
        "y": y_abs.detach(),
        "gx": d_a * factor / std,
        "gw": d_wb,
        "std": ref.get("std"),
        "alpha": alpha.abs() if s is None else None,
    }
    if b is not None:
        mass["gb"] = d_b
    if s is not None:
        mass["gs"] = d_s
    return ref, {k: v for k, v in mass.items() if v is not None}


def _spread(grads, b, s):
    """(gx, gw, gb?, gs?) as a list with None where absent."""
    it = iter(grads)
    gx, gw = next(it), next(it)
    gb = next(it) if b is not None else None
    gs = next(it) if s is not None else None
    return [gx, gw, gb, gs]


def conv_eps(ck, x_dtype, w_dtype, k, n_pix, t_in, amp):
    """The bound's factor ``eps`` per output (see :func:`within_rounding`), for a
    convolution in format ``ck`` on an input in ``x_dtype`` and a weight in ``w_dtype``,
    ``k`` weights per output channel, ``n_pix`` = N x H_out x W_out terms in each
    weight- or bias-gradient sum and ``t_in`` terms in each input-gradient sum
    (O/groups x kh x kw), under AMP (``amp``: no fold in the forward) or not. u is
    ``ck``'s unit roundoff. A sum of ``n`` terms costs ``n`` float32 steps where
    :func:`libtorch_sums_in_float32` says libtorch forms it so, else ``(n - 1) u``.

    - y = conv(a, w_b * s, b * s): the scale s rounded (1), w_b (ste_v2: sign x mean|W|,
      1) and w_b * s (1) rounded, b * s (1), the output (1): 5 u, and the k-term sum.
      Under AMP y = conv(a, w_b) * s: w_b (1) and the convolution's output (1) in ck,
      s and the product in float32 (2 float32 steps), and the k-term sum.
    - std (x's format u_x): moments in float64, one rounding (u_x) and float32 sqrt and
      divide (4 float32 steps).
    - alpha (W's format u_w): a float32 mean of k terms (k float32 steps), one rounding
      (u_w).
    - gx = conv_transpose(g, w_b * s) x max(0, 2 - 2|x/std|) / std: w_b * s as in y
      (3 u), the t_in-term sum, its rounding (1), std's rounding reaching the factor (its
      mass carries the 2|x_hat| term) and the division (2), the output (1): 7 u and the
      sum.
    - gw, gb, gs: the n_pix-term sum of the weight (bias) gradient, its rounding (1), s
      (1) and the products with s and w_b (2), the output (1): 5 u and the sum; for gs
      also a float32 sum over k (k float32 steps).
    """
    u = UNIT_ROUNDOFF[ck]

    def total(which, n):
        return n * F32_U if libtorch_sums_in_float32(ck, which) else (n - 1) * u

    y = 2 * u + 2 * F32_U if amp else 5 * u
    return {
        "y": y + total("forward", k),
        "std": UNIT_ROUNDOFF[x_dtype] + 4 * F32_U,
        "alpha": UNIT_ROUNDOFF[w_dtype] + k * F32_U,
        "gx": 7 * u + total("input", t_in),
        "gw": 5 * u + total("weight", n_pix),
        "gb": 5 * u + total("bias", n_pix),
        "gs": 5 * u + total("weight", n_pix) + k * F32_U,
    }


LOW_CASES = [
    (
        "wide_learnable",
        dict(n=2, c=32, h=4, wd=4, o=6, k=3, learnable=True),
        "hardtanh",
        dict(padding=1),
        False,
    ),
    (
        "bias_ste_v2_channels_last",
        dict(n=2, c=4, h=7, wd=6, o=5, k=3, bias=True),
        "ste_v2",
        dict(stride=2, padding=1),
        True,
    ),
    (
        "dilated_hardtanhv2",
        dict(n=2, c=4, h=8, wd=8, o=4, k=3),
        "hardtanhv2",
        dict(padding=2, dilation=2),
        False,
    ),
]


def _check_low(x, w, b, s, act_w, geo, g, ck, amp=None, training=True):
    with route(True, "conv_forward", "conv_backward"):
        fused = run_conv(x, w, b, s, act_w, geo, g, training=training, amp=amp)
    ref, mass = conv_masses(x, w, b, s, act_w, geo, g.to(fused["y"].dtype), training)
    o, cg = w.shape[0], w.shape[1]
    k = cg * w.shape[2] * w.shape[3]
    groups = geo[3]
    n_pix = fused["y"].shape[0] * fused["y"].shape[2] * fused["y"].shape[3]
    t_in = (o // groups) * w.shape[2] * w.shape[3]
    eps = conv_eps(ck, x.dtype, w.dtype, k, n_pix, t_in, amp is not None)
    checked = []
    for key, r in ref.items():
        got = fused[key]
        assert got.shape == r.shape, key
        assert_within_rounding(got, r, mass[key], eps[key], key)
        checked.append(key)
    assert {"y", "gx", "gw"} <= set(checked)
    return fused


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", LOW_CASES, ids=[c[0] for c in LOW_CASES])
def test_conv_low_precision_within_rounding_of_the_oracle(host, dtype, case):
    x, w, b, s, act_w, geo = _case_tensors(case, dtype)
    g = output_grad(_y_shape(x, w, geo), seed=12).to(dtype)
    fused = _check_low(x, w, b, s, act_w, geo, g, dtype)
    assert fused["y"].dtype == dtype


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("learnable", [False, True])
def test_conv_amp_float32_weights_low_precision_activations(host, amp, learnable):
    """AMP: float32 input and weights, the convolution under CPU autocast in ``amp``:
    the mixed-dtype kernels (sign f32 -> f16/bf16, weight prep f32 -> f16/bf16, the
    gradients back to float32)."""
    x, w, b, s = conv_inputs(2, 8, 6, 6, 6, 3, bias=not learnable, learnable=learnable, seed=13)
    geo = geometry(padding=1)
    g = output_grad((2, 6, 6, 6), seed=14).to(amp)
    fused = _check_low(x, w, b, s, "ste", geo, g, amp, amp=amp)
    assert fused["gw"].dtype == torch.float32 and fused["gx"].dtype == torch.float32
    with route(False):
        cpu = run_conv(x, w, b, s, "ste", geo, g, amp=amp)
    for k in cpu:
        assert fused[k].dtype == cpu[k].dtype and fused[k].shape == cpu[k].shape, k


# ---------------------------------------------------------------------------------------
# AGS + SAD
# ---------------------------------------------------------------------------------------
AGS_CFG = dict(
    enable_ags=True,
    delta=0.05,
    enable_dampen=True,
    dampen_weight=0.01,
    track_momentum=0.9,
    track_threshold=0.05,
)


def ags_layers(dtype, channels_last=False):
    """Three layers; per channel gradients AGS rescales (ratio under delta), leaves
    alone (over it), all-zero gradients and all-zero weights (the norm floors); one
    channel of 300 weights (more than a block's 256 threads). Trackers 0, 0.02 or 0.5
    keep every new tracker value (0.9 t + 0.1 flip) far from the threshold 0.05, so
    the dampening mask is the oracle's."""
    gen = torch.Generator().manual_seed(20)
    layers = []
    for o, shape in ((6, (6, 300)), (4, (4, 3, 3, 3)), (3, (3, 5))):
        w = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.2
        gscale = torch.tensor([1e-4, 1.0, 0.0, 3e-3, 0.5, 1e-2][:o], dtype=torch.float64)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64)
        grad = grad * gscale.reshape((o,) + (1,) * (len(shape) - 1))
        w[-1] = 0.0 if o > 3 else w[-1]  # a zero-norm weight channel
        pick = torch.randint(0, 3, shape, generator=gen)
        tracker = torch.tensor([0.0, 0.02, 0.5], dtype=torch.float64)[pick]
        flip = torch.rand(shape, generator=gen) < 0.3
        prev = torch.where(flip, -w, w)
        layer = [t.to(dtype) for t in (grad, w, tracker, prev)]
        if channels_last and len(shape) == 4:
            layer = [t.contiguous(memory_format=torch.channels_last) for t in layer]
        layers.append(layer)
    return layers


def run_ags(layers, host_on, cfg=AGS_CFG):
    copies = [[t.clone() for t in layer] for layer in layers]
    for c, layer in zip(copies, layers):
        for t, orig in zip(c, layer):
            assert t.stride() == orig.stride()
    ctx = route(True, "ags_sad_step") if host_on else route(False)
    with ctx:
        figures = _core.ags_sad_step(
            _core.OvSWConfig(**cfg),
            [c[0] for c in copies],
            [c[1] for c in copies],
            [c[2] for c in copies] if cfg["enable_dampen"] else [None] * len(copies),
            [c[3] for c in copies] if cfg["enable_dampen"] else [None] * len(copies),
        )
    return figures, copies


@pytest.mark.parametrize("channels_last", [False, True])
def test_ags_sad_float32_equals_the_cpu_route(host, channels_last):
    layers = ags_layers(torch.float32, channels_last)
    hf, hl = run_ags(layers, True)
    cf, cl = run_ags(layers, False)
    assert within(rel_err(hf, cf), FP32_TOL)
    for i, (h, c) in enumerate(zip(hl, cl)):
        for name, a, b in zip(("grad", "weight", "tracker", "prev"), h, c):
            assert within(rel_err(a, b), FP32_TOL), (i, name)
        assert torch.equal(h[3], c[3]) and torch.equal(h[1], layers[i][1])
    # The case covers channels AGS rescales and channels it leaves alone.
    g0, w0 = layers[0][0].double(), layers[0][1].double()
    r = g0.norm(dim=1).clamp_min(testing.GRAD_NORM_FLOOR) / w0.norm(dim=1).clamp_min(
        testing.WEIGHT_NORM_FLOOR
    )
    assert (r < AGS_CFG["delta"]).any() and (r >= AGS_CFG["delta"]).any()
    # A planted error just beyond 1e-5 is refused.
    planted = hl[0][0].clone()
    planted.view(-1)[5] += 2e-5 * planted.abs().max()
    assert not within(rel_err(planted, cl[0][0]), FP32_TOL)


@pytest.mark.parametrize("enable", [(True, False), (False, True)])
def test_ags_or_sad_alone_equals_the_cpu_route(host, enable):
    cfg = dict(AGS_CFG, enable_ags=enable[0], enable_dampen=enable[1])
    layers = ags_layers(torch.float32)
    hf, hl = run_ags(layers, True, cfg)
    cf, cl = run_ags(layers, False, cfg)
    assert torch.equal(torch.isnan(hf), torch.isnan(cf))
    assert within(rel_err(hf, cf), FP32_TOL)
    for h, c in zip(hl, cl):
        for a, b in zip(h, c):
            assert within(rel_err(a, b), FP32_TOL)
    if not enable[1]:
        # AGS alone leaves the gradients of channels over delta as they were, exactly,
        # and rescales the others: both kinds are in the case.
        left = [torch.equal(hl[0][0][c], layers[0][0][c]) for c in range(6)]
        assert any(left) and not all(left)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_ags_sad_low_precision_within_rounding_of_the_oracle(host, dtype):
    """Against ``oracle_ags_sad`` in float64 on the same rounded tensors. The kernels
    form the norms and the factor ``delta * w / g`` in float32 or better (a k-term sum
    of squares: k float32 steps, square root and division: 4), so the figures' AGS
    ratio is within ``(k + 8) 2^-24`` relative. The new gradient
    ``g * f + lambda * M * W`` takes at most two roundings in the format (2 u, if the
    AGS result is stored before SAD adds), the factor's float32 error and three float32
    steps (the two products and the sum), times its mass ``|g f| + |lambda M W|``;
    the tracker ``m t + (1 - m) flip`` one rounding (u) and float32 steps (4 x 2^-24)
    times ``m |t| + (1 - m) flip``. ``weight_prev``
    is W copied, exactly; the silent fraction counts the same mask, exactly."""
    u = UNIT_ROUNDOFF[dtype]
    layers = ags_layers(dtype)
    figures, got = run_ags(layers, True)
    for i, (layer, g) in enumerate(zip(layers, got)):
        grad, w, tracker, prev = (t.double() for t in layer)
        ags, silent = testing.oracle_ags_sad(grad, w, tracker, prev, **AGS_CFG)
        k = w[0].numel()
        eps_f = (k + 8) * F32_U
        assert within(abs(figures[i, 0].item() - ags) / ags, eps_f), i
        assert figures[i, 1].item() == silent
        # masses, from the inputs
        g0, w0, t0, p0 = (t.double() for t in layer)
        o = w0.shape[0]
        gn = g0.reshape(o, -1).norm(dim=1).clamp_min(testing.GRAD_NORM_FLOOR)
        wn = w0.reshape(o, -1).norm(dim=1).clamp_min(testing.WEIGHT_NORM_FLOOR)
        r = gn / wn
        f = torch.where(r < AGS_CFG["delta"], AGS_CFG["delta"] * wn / gn, torch.ones_like(r))
        f = f.reshape((o,) + (1,) * (w0.dim() - 1))
        mask = (tracker < AGS_CFG["track_threshold"]).double()
        m = AGS_CFG["track_momentum"]
        flip = (torch.sign(w0) != torch.sign(p0)).double()
        grad_mass = (g0 * f).abs() + AGS_CFG["dampen_weight"] * mask * w0.abs()
        t_mass = m * t0.abs() + (1 - m) * flip
        assert_within_rounding(g[0], grad, grad_mass, 2 * u + eps_f + 3 * F32_U, f"grad {i}")
        assert_within_rounding(g[2], tracker, t_mass + 1e-300, u + 4 * F32_U, f"tracker {i}")
        assert torch.equal(g[3], layer[1])


# ---------------------------------------------------------------------------------------
# The kernel bindings' stream argument
# ---------------------------------------------------------------------------------------
def test_kernel_bindings_take_a_stream_argument_on_the_host(host):
    """``stream=`` on the host launcher: the same results as the current stream (the
    host launcher runs each launch to its end, so no stream can race here; what the
    argument does to the allocator on a GPU only a GPU shows)."""
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(30))
    a0, s0 = _core.cuda_binarize_activation(x, True, "float16")
    a1, s1 = _core.cuda_binarize_activation(x, True, "float16", stream=0)
    assert torch.equal(a0, a1) and torch.equal(s0, s1)
    gx0 = _core.cuda_bireal_backward(torch.ones_like(x), x, s0)
    gx1 = _core.cuda_bireal_backward(torch.ones_like(x), x, s0, stream=0)
    assert torch.equal(gx0, gx1)


@pytest.mark.cuda
def test_kernel_bindings_on_a_side_stream():
    """On a GPU: a pass given a side stream runs there with that stream made current for
    the call (so its outputs and temporaries are allocated on it), gives what the
    current stream gives, and leaves the current stream and device as they were."""
    x = torch.randn(3, 4, 70, 70, device="cuda")  # two moment chunks a sample
    a0, s0 = _core.cuda_binarize_activation(x, True, "float16")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    main, device = torch.cuda.current_stream(), torch.cuda.current_device()
    a1, s1 = _core.cuda_binarize_activation(x, True, "float16", stream=side.cuda_stream)
    assert torch.cuda.current_stream() == main
    assert torch.cuda.current_device() == device
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(a0, a1) and torch.equal(s0, s1)
