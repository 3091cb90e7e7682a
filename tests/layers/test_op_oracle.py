"""The Rust core against the plain-PyTorch oracle of SPEC sections 1-3 (``ovsw.testing``).

- the binary convolution (OvSWConv2d forward and backward) over random geometries,
  binarizers, scale options, modes and dtypes;
- the binary linear layer (OvSWLinear) likewise, over input ranks and feature counts;
- AGS + SAD (``ovsw._core.ags_sad_step``) on its fused float32 path and its generic
  libtorch path (float64, non-contiguous tensors);
- a whole model trained a few steps with ``ovsw.OvSW`` and with the oracle.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ovsw
from ovsw import _core
from ovsw.testing import (
    ACT_W,
    OracleConv2d,
    OracleLinear,
    OracleOvSW,
    channel_abs_mean,
    max_abs_err,
    oracle_ags_sad,
    oracle_binary_conv2d,
    oracle_binary_linear,
    rel_err,
    to_oracle,
    within,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def assert_rel_close(actual, expected, rtol, what=""):
    """``max |actual - expected| <= rtol * max |expected|`` (same shape, all finite)."""
    assert actual is not None and expected is not None, what
    assert actual.shape == expected.shape, f"{what}: {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} vs {expected.dtype}"
    if actual.numel() == 0:
        return
    assert torch.isfinite(expected).all(), f"{what}: oracle not finite"
    assert torch.isfinite(actual).all(), f"{what}: core not finite"
    err = rel_err(actual, expected, floor=1e-30)
    assert within(err, rtol), (
        f"{what}: max abs diff {max_abs_err(actual, expected):.3e}, largest magnitude "
        f"{expected.detach().abs().max().item():.3e}, relative {err:.3e} > {rtol:.0e}"
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_assert_rel_close_refuses_a_nonfinite_core_result(bad):
    expected = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    actual = expected + 1e-7
    assert_rel_close(actual, expected, 1e-6, "clean")
    actual[1, 0] = bad
    with pytest.raises(AssertionError, match="core not finite"):
        assert_rel_close(actual, expected, 1e-6, "poisoned")


def nonzero_randn(shape, gen, dtype, floor=0.02):
    """Standard normal values pushed away from zero (no exact or near-exact zeros)."""
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.where(v >= 0, v + floor, v - floor)
    return v.to(dtype)


# ---------------------------------------------------------------------------------------
# SPEC 1: the binary convolution
# ---------------------------------------------------------------------------------------
@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    n = draw(st.integers(1, 3))
    # input large enough for at least one output position
    h = draw(st.integers(max(3, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(3, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    scaling_factor = draw(st.booleans())
    if not scaling_factor and (c_in // groups) * kh * kw < 2:
        # Var over a single weight per channel is NaN (n - 1 = 0): a degenerate case
        # checked separately below.
        kh = 2
        h = max(h, dilation[0] + 1 - 2 * padding[0])
    return dict(
        n=n,
        c_in=c_in,
        c_out=c_out,
        kernel=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        hw=(h, w),
        bias=draw(st.booleans()),
        act_w=draw(st.sampled_from(ACT_W)),
        scaling_factor=scaling_factor,
        training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        x_scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
        w_scale=draw(st.sampled_from([0.05, 0.5, 1.5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_conv_pair(case):
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    conv = ovsw.OvSWConv2d(
        case["c_in"],
        case["c_out"],
        case["kernel"],
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
        bias=case["bias"],
        dtype=dtype,
        act_w=case["act_w"],
        scaling_factor=case["scaling_factor"],  # (re-initialised below from the weight)
    )
    with torch.no_grad():
        conv.weight.copy_(nonzero_randn(conv.weight.shape, gen, dtype) * case["w_scale"])
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=dtype))
    if case["scaling_factor"]:
        conv.init_scaling_factor()
        with torch.no_grad():  # move it off its initial value, keep it positive
            conv.scaling_factor.mul_(
                torch.rand(conv.scaling_factor.shape, generator=gen, dtype=dtype) + 0.5
            )
    conv.train(case["training"])
    oracle = to_oracle(conv)
    assert isinstance(oracle, OracleConv2d) and oracle.training == case["training"]
    return conv, oracle, gen


@SETTINGS
@given(case=conv_cases())
def test_conv_matches_oracle(case):
    dtype = case["dtype"]
    conv, oracle, gen = _make_conv_pair(case)
    for name, p in conv.named_parameters():
        q = dict(oracle.named_parameters())[name]
        assert p is not q and torch.equal(p, q), name

    x = nonzero_randn((case["n"], case["c_in"], *case["hw"]), gen, dtype) * case["x_scale"]
    x_core = x.clone().requires_grad_(True)
    x_orac = x.clone().requires_grad_(True)
    y_core = conv(x_core)
    y_orac = oracle(x_orac)
    rtol = RTOL[dtype]
    assert_rel_close(y_core, y_orac, rtol, "y")

    upstream = torch.randn(y_orac.shape, generator=gen, dtype=dtype)
    y_core.backward(upstream)
    y_orac.backward(upstream)
    assert_rel_close(x_core.grad, x_orac.grad, rtol, "grad x")
    assert_rel_close(conv.weight.grad, oracle.weight.grad, rtol, "grad weight")
    if case["bias"]:
        assert_rel_close(conv.bias.grad, oracle.bias.grad, rtol, "grad bias")
    if case["scaling_factor"]:
        assert_rel_close(
            conv.scaling_factor.grad, oracle.scaling_factor.grad, rtol, "grad scaling_factor"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling_factor", [False, True])
@pytest.mark.parametrize("act_w", ACT_W)
def test_conv_binarizers_match_oracle(act_w, scaling_factor, training, dtype):
    """Every binarizer on a layer whose weights straddle both hardtanh bounds (1 and
    mean_o|W|) and whose normalised inputs straddle the Bi-Real cut-off |x_hat| = 1."""
    case = dict(
        n=3,
        c_in=6,
        c_out=8,
        kernel=(3, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=2,
        hw=(7, 7),
        bias=True,
        act_w=act_w,
        scaling_factor=scaling_factor,
        training=training,
        dtype=dtype,
        x_scale=1.0,
        w_scale=1.0,
        seed=7,
    )
    conv, oracle, gen = _make_conv_pair(case)
    w = conv.weight.detach()
    bound = channel_abs_mean(w).view(-1, 1, 1, 1)
    assert 0.2 < (w.abs() < 1).double().mean() < 0.8
    assert 0.2 < (w.abs() < bound).double().mean() < 0.8
    x = nonzero_randn((3, 6, 7, 7), gen, dtype)
    x_core = x.clone().requires_grad_(True)
    x_orac = x.clone().requires_grad_(True)
    y_core, y_orac = conv(x_core), oracle(x_orac)
    rtol = RTOL[dtype]
    assert_rel_close(y_core, y_orac, rtol, "y")
    upstream = torch.randn(y_orac.shape, generator=gen, dtype=dtype)
    y_core.backward(upstream)
    y_orac.backward(upstream)
    assert (x_orac.grad == 0).any() and (x_orac.grad != 0).any()
    assert_rel_close(x_core.grad, x_orac.grad, rtol, "grad x")
    assert_rel_close(conv.weight.grad, oracle.weight.grad, rtol, "grad weight")
    assert_rel_close(conv.bias.grad, oracle.bias.grad, rtol, "grad bias")
    if scaling_factor:
        assert_rel_close(
            conv.scaling_factor.grad, oracle.scaling_factor.grad, rtol, "grad scaling_factor"
        )


def test_conv_functional_oracle_matches_module():
    """oracle_binary_conv2d called directly equals OracleConv2d, and a learnable scale
    starts at mean_o|W| in both implementations."""
    torch.manual_seed(0)
    conv = ovsw.OvSWConv2d(4, 6, 3, padding=1, act_w="ste_v2", scaling_factor=True)
    orac = OracleConv2d(4, 6, 3, padding=1, act_w="ste_v2")
    with torch.no_grad():
        orac.weight.copy_(conv.weight)
    orac.init_scaling_factor()
    assert_rel_close(conv.scaling_factor, orac.scaling_factor, 1e-6, "scaling_factor init")
    assert_rel_close(conv.scaling_factor, channel_abs_mean(conv.weight), 1e-6, "mean|W|")
    x = torch.randn(2, 4, 5, 5)
    y = oracle_binary_conv2d(
        x, orac.weight, None, orac.scaling_factor, "ste_v2", 1, 1, 1, 1, training=True
    )
    assert_rel_close(conv(x), y, 1e-5, "y")
    assert_rel_close(orac(x), y, 0.0, "functional vs module")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_single_weight_per_channel_is_nan_in_both(dtype):
    """With one weight per output channel the unbiased Var of SPEC 1.4 is NaN; the core
    follows the formula (as upstream would) rather than inventing a value. The layer's
    constructor refuses such a layer without ``scaling_factor`` (``test_errors.py``); one
    made on the meta device is not checked, which is how this one is made."""
    conv = ovsw.OvSWConv2d(2, 4, 1, groups=2, dtype=dtype, device="meta").to_empty(device="cpu")
    torch.nn.init.normal_(conv.weight)
    orac = to_oracle(conv)
    x = torch.randn(2, 2, 4, 4, dtype=dtype)
    with warnings.catch_warnings():  # torch warns about var() with one element
        warnings.simplefilter("ignore", UserWarning)
        y_core, y_orac = conv(x), orac(x)
    assert torch.isnan(y_orac).all()
    assert torch.equal(torch.isnan(y_core), torch.isnan(y_orac))


# ---------------------------------------------------------------------------------------
# The binary linear layer
# ---------------------------------------------------------------------------------------
@st.composite
def linear_cases(draw):
    scaling_factor = draw(st.booleans())
    # Two features or more: the unbiased Var of a single value (a one-feature sample, a
    # one-weight alpha) is NaN, a degenerate case the conv tests check separately.
    in_features = draw(st.integers(2, 70))
    lead = draw(st.sampled_from([(), (), (3,), (2, 2)]))
    return dict(
        n=draw(st.integers(1, 4)),
        lead=lead,
        in_features=in_features,
        out_features=draw(st.integers(1, 9)),
        bias=draw(st.booleans()),
        act_w=draw(st.sampled_from(ACT_W)),
        scaling_factor=scaling_factor,
        training=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "transposed"])),
        x_scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
        w_scale=draw(st.sampled_from([0.05, 0.5, 1.5])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_linear_pair(case):
    dtype = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    layer = ovsw.OvSWLinear(
        case["in_features"],
        case["out_features"],
        bias=case["bias"],
        dtype=dtype,
        act_w=case["act_w"],
    )
    with torch.no_grad():
        layer.weight.copy_(nonzero_randn(layer.weight.shape, gen, dtype) * case["w_scale"])
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=dtype))
    if case["scaling_factor"]:
        layer.init_scaling_factor()
        with torch.no_grad():
            layer.scaling_factor.mul_(
                torch.rand(layer.scaling_factor.shape, generator=gen, dtype=dtype) + 0.5
            )
    layer.train(case["training"])
    oracle = to_oracle(layer)
    assert isinstance(oracle, OracleLinear) and oracle.training == case["training"]
    return layer, oracle, gen


def _check_linear(case):
    dtype = case["dtype"]
    layer, oracle, gen = _make_linear_pair(case)
    shape = (case["n"], *case["lead"], case["in_features"])
    x = nonzero_randn(shape, gen, dtype) * case["x_scale"]
    if case["layout"] == "transposed":  # a non-contiguous input: the generic route
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    x_core = x.clone(memory_format=torch.preserve_format).requires_grad_(True)
    x_orac = x.clone().requires_grad_(True)
    y_core, y_orac = layer(x_core), oracle(x_orac)
    rtol = RTOL[dtype]
    assert_rel_close(y_core, y_orac, rtol, "y")
    upstream = torch.randn(y_orac.shape, generator=gen, dtype=dtype)
    y_core.backward(upstream)
    y_orac.backward(upstream)
    assert_rel_close(x_core.grad, x_orac.grad, rtol, "grad x")
    assert_rel_close(layer.weight.grad, oracle.weight.grad, rtol, "grad weight")
    if case["bias"]:
        assert_rel_close(layer.bias.grad, oracle.bias.grad, rtol, "grad bias")
    if case["scaling_factor"]:
        assert_rel_close(
            layer.scaling_factor.grad, oracle.scaling_factor.grad, rtol, "grad scaling_factor"
        )
    return x_orac.grad


@SETTINGS
@given(case=linear_cases())
def test_linear_matches_oracle(case):
    _check_linear(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling_factor", [False, True])
@pytest.mark.parametrize("act_w", ACT_W)
def test_linear_binarizers_match_oracle(act_w, scaling_factor, training, dtype):
    """Every binarizer on a layer whose weights straddle both hardtanh bounds and whose
    normalised inputs straddle the Bi-Real cut-off, on a [N, T, in] input."""
    case = dict(
        n=4,
        lead=(3,),
        in_features=40,
        out_features=6,
        bias=True,
        act_w=act_w,
        scaling_factor=scaling_factor,
        training=training,
        dtype=dtype,
        layout="contiguous",
        x_scale=1.0,
        w_scale=1.0,
        seed=11,
    )
    layer, _, _ = _make_linear_pair(case)
    w = layer.weight.detach()
    assert 0.2 < (w.abs() < 1).double().mean() < 0.8
    assert 0.2 < (w.abs() < channel_abs_mean(w).view(-1, 1)).double().mean() < 0.8
    grad_x = _check_linear(case)
    assert (grad_x == 0).any() and (grad_x != 0).any()


def test_linear_normalises_each_sample_over_all_its_dims():
    """The per-sample std spans every non-batch dim: scaling one sample's whole input
    leaves the training-mode output unchanged, scaling one position of it does not."""
    torch.manual_seed(0)
    layer = ovsw.OvSWLinear(16, 4)
    x = torch.randn(2, 3, 16)
    y = layer(x)
    scaled = x.clone()
    scaled[0] *= 7.0
    torch.testing.assert_close(layer(scaled), y, rtol=0, atol=0)
    y_fn = oracle_binary_linear(x, layer.weight, None, None, "ste", training=True)
    assert_rel_close(y, y_fn, 1e-5, "functional oracle")


def test_linear_product_is_exact_in_float32():
    """With +-1 operands the product is an integer: the core's float32 result equals the
    float64 one exactly before scaling (4096 features, well below 2^24)."""
    torch.manual_seed(0)
    layer = ovsw.OvSWLinear(4096, 8, scaling_factor=True).eval()
    with torch.no_grad():
        layer.scaling_factor.fill_(1.0)
    x = torch.randn(5, 4096)
    y = layer(x)
    exact = torch.sign(x).double() @ torch.sign(layer.weight).double().t()
    assert torch.equal(y.double(), exact)


# ---------------------------------------------------------------------------------------
# SPEC 2 and 3: AGS and SAD
# ---------------------------------------------------------------------------------------
MOMENTA = [0.0, 0.5, 0.9, 0.99, 0.999]
THRESHOLDS = [1e-4, 3e-3, 0.05, 0.3]  # none equals any 1 - m above (boundary cases)


@st.composite
def ags_sad_cases(draw):
    n_layers = draw(st.integers(1, 4))
    shapes = [
        (
            draw(st.integers(1, 8)),
            draw(st.integers(1, 5)),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 3)),
        )
        for _ in range(n_layers)
    ]
    return dict(
        shapes=shapes,
        enable_ags=draw(st.booleans()),
        enable_dampen=draw(st.booleans()),
        dampen_weight=draw(st.sampled_from([0.0, 2e-5, 9e-4, 0.1, 1.5])),
        track_momentum=draw(st.sampled_from(MOMENTA)),
        track_threshold=draw(st.sampled_from(THRESHOLDS)),
        # where delta sits among the channel ratios: 0 below all, 1 above all, else a gap
        delta_pos=draw(st.floats(0.0, 1.0)),
        pass_buffers_when_off=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _ags_sad_tensors(case, dtype, gen):
    """Per layer (grad, weight, tracker, prev) in ``dtype``, contiguous, built so that
    no AGS ratio sits at delta and no updated tracker value sits at tau."""
    m, tau = case["track_momentum"], case["track_threshold"]
    layers = []
    for shape in case["shapes"]:
        o = shape[0]
        w = nonzero_randn(shape, gen, torch.float64) * 0.1
        # channel scales: some tiny weights (floor 1e-3 of ||W_o|| applies)
        w_scale = 10.0 ** torch.empty(o, dtype=torch.float64).uniform_(-5, 1, generator=gen)
        w = w * w_scale.view(o, 1, 1, 1)
        zero_w = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.05
        w[zero_w] = 0.0  # a few exact zeros: sign(0) = 0
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g_scale = 10.0 ** torch.empty(o, dtype=torch.float64).uniform_(-6, 0, generator=gen)
        g = g * g_scale.view(o, 1, 1, 1)
        zero_g = torch.rand(o, generator=gen) < 0.15
        g[zero_g] = 0.0  # whole zero-gradient channels (floor 1e-6 of ||G_o|| applies)

        # weight_prev: W with some signs flipped, some magnitudes moved, some zeros
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        p = w * (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5)
        p = torch.where(u < 0.3, -p, p)
        p = torch.where((u >= 0.3) & (u < 0.35), torch.zeros_like(p), p)
        p = torch.where(zero_w & (u < 0.5), torch.full_like(p, 0.7), p)

        # tracker: zeros, values well below tau and well above it
        k = torch.randint(0, 3, shape, generator=gen)
        below = tau * torch.empty(shape, dtype=torch.float64).uniform_(0.0, 0.8, generator=gen)
        hi = max(1.0, 1.2 * tau)
        above = torch.empty(shape, dtype=torch.float64).uniform_(1.2 * tau, hi, generator=gen)
        t = torch.where(k == 0, torch.zeros_like(below), torch.where(k == 1, below, above))
        # keep every updated value T' = m T + (1 - m) flip away from tau (|T'/tau - 1| > 1%)
        flipped = (torch.sign(w.to(dtype)) != torch.sign(p.to(dtype))).double()
        t_new = m * t + (1 - m) * flipped
        t = torch.where((t_new / tau - 1).abs() < 1e-2, torch.zeros_like(t), t)
        t_new = m * t + (1 - m) * flipped
        assert ((t_new / tau - 1).abs() >= 1e-2).all()
        layers.append([g.to(dtype), w.to(dtype), t.to(dtype), p.to(dtype)])
    return layers


def _choose_delta(case, layers):
    """A delta between two channel ratios (some channels scaled, some not), away from
    every ratio by at least a few percent; or below / above them all at the ends."""
    ratios = []
    for g, w, _, _ in layers:
        o = w.shape[0]
        gn = g.double().reshape(o, -1).norm(dim=1).clamp_min(1e-6)
        wn = w.double().reshape(o, -1).norm(dim=1).clamp_min(1e-3)
        ratios += (gn / wn).tolist()
    ratios = sorted(ratios)
    gaps = [(a, b) for a, b in zip(ratios, ratios[1:]) if b > 1.1 * a]
    pos = case["delta_pos"]
    if pos < 0.1 or not gaps:
        return ratios[0] / 10 if pos < 0.5 else ratios[-1] * 10
    if pos > 0.9:
        return ratios[-1] * 10
    a, b = gaps[min(int((pos - 0.1) / 0.8 * len(gaps)), len(gaps) - 1)]
    return math.sqrt(a * b)


def _check_ags_sad(case, dtype, layout):
    gen = torch.Generator().manual_seed(case["seed"])
    layers = _ags_sad_tensors(case, dtype, gen)
    delta = _choose_delta(case, layers)
    kw = dict(
        enable_ags=case["enable_ags"],
        delta=delta,
        enable_dampen=case["enable_dampen"],
        dampen_weight=case["dampen_weight"],
        track_momentum=case["track_momentum"],
        track_threshold=case["track_threshold"],
    )
    cfg = _core.OvSWConfig(track_ones=False, **kw)

    core_layers = []
    for g, w, t, p in layers:
        if layout == "channels_last":  # non-contiguous (generic path)
            g, w, t, p = (x.contiguous(memory_format=torch.channels_last) for x in (g, w, t, p))
        elif layout == "permuted":  # non-contiguous grad and weight only
            g = g.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
            w = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
        core_layers.append([v.clone(memory_format=torch.preserve_format) for v in (g, w, t, p)])
    oracle_layers = [[x.clone() for x in lyr] for lyr in layers]

    pass_buffers = case["enable_dampen"] or case["pass_buffers_when_off"]
    figures = _core.ags_sad_step(
        cfg,
        [lyr[0] for lyr in core_layers],
        [lyr[1] for lyr in core_layers],
        [lyr[2] if pass_buffers else None for lyr in core_layers],
        [lyr[3] if pass_buffers else None for lyr in core_layers],
    )
    assert figures.shape == (len(layers), 2) and figures.dtype == torch.float64
    assert figures.device == core_layers[0][1].device
    rtol = RTOL[dtype]
    for i, ((cg, cw, ct, cp), (og, ow, ot, op), orig, fig) in enumerate(
        zip(core_layers, oracle_layers, layers, figures)
    ):
        expected = oracle_ags_sad(og, ow, ot, op, **kw)
        what = f"layer {i} {tuple(orig[1].shape)} {dtype} {layout}"
        assert_rel_close(cg, og, rtol, f"{what}: grad")
        assert torch.equal(cw, orig[1]), f"{what}: weight changed"
        if case["enable_dampen"]:
            assert_rel_close(ct, ot, rtol, f"{what}: tracker")
            assert torch.equal(cp, op), f"{what}: weight_prev"
        else:  # buffers untouched when SAD is off
            assert torch.equal(ct, orig[2]) and torch.equal(cp, orig[3]), what
        ags, silent = fig.tolist()
        if case["enable_ags"]:
            assert math.isclose(ags, expected[0], rel_tol=10 * rtol), (
                f"{what}: ags_ratio {ags} vs {expected[0]}"
            )
        else:
            assert math.isnan(ags) and expected[0] is None, what
        if case["enable_dampen"]:
            assert math.isclose(silent, expected[1], abs_tol=1e-12), (
                f"{what}: silent_ratio {silent} vs {expected[1]}"
            )
        else:
            assert math.isnan(silent) and expected[1] is None, what
    return layers


@SETTINGS
@given(case=ags_sad_cases())
def test_ags_sad_fused_float32(case):
    _check_ags_sad(case, torch.float32, "contiguous")


@SETTINGS
@given(case=ags_sad_cases())
def test_ags_sad_generic_float64(case):
    _check_ags_sad(case, torch.float64, "contiguous")


@settings(SETTINGS, max_examples=30)
@given(case=ags_sad_cases(), layout=st.sampled_from(["channels_last", "permuted"]))
def test_ags_sad_generic_noncontiguous_float32(case, layout):
    _check_ags_sad(case, torch.float32, layout)


def test_ags_sad_cases_are_not_trivial():
    """The generator yields silent masks that are neither all ones nor all zeros, and
    deltas that scale some channels but not others."""
    case = dict(
        shapes=[(8, 4, 3, 3), (6, 2, 3, 3)],
        enable_ags=True,
        enable_dampen=True,
        dampen_weight=0.1,
        track_momentum=0.9,
        track_threshold=0.05,
        delta_pos=0.5,
        pass_buffers_when_off=False,
        seed=1,
    )
    layers = _ags_sad_tensors(case, torch.float32, torch.Generator().manual_seed(1))
    delta = _choose_delta(case, layers)
    below = above = 0
    for g, w, t, p in layers:
        o = w.shape[0]
        r = g.reshape(o, -1).norm(dim=1).clamp_min(1e-6) / w.reshape(o, -1).norm(dim=1).clamp_min(
            1e-3
        )
        below += int((r < delta).sum())
        above += int((r >= delta).sum())
        _, silent = oracle_ags_sad(
            g.clone(),
            w,
            t.clone(),
            p.clone(),
            enable_ags=False,
            delta=delta,
            enable_dampen=True,
            dampen_weight=0.1,
            track_momentum=0.9,
            track_threshold=0.05,
        )
        assert 0.05 < silent < 0.95
    assert below > 0 and above > 0


# ---------------------------------------------------------------------------------------
# A whole model: ovsw.OvSW vs the oracle
# ---------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, act_w="ste", scaling_factor=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            ovsw.OvSWConv2d(8, 8, 3, padding=1, act_w=act_w),
            nn.BatchNorm2d(8),
            nn.Hardtanh(),
            ovsw.OvSWConv2d(
                8, 16, 3, stride=2, padding=1, act_w=act_w, scaling_factor=scaling_factor
            ),
            nn.BatchNorm2d(16),
            nn.Hardtanh(),
            ovsw.OvSWConv2d(16, 16, 1, groups=2, bias=True, act_w=act_w),
            nn.BatchNorm2d(16),
        )
        self.hidden = ovsw.OvSWLinear(16, 12, bias=True, act_w=act_w, scaling_factor=scaling_factor)
        self.bn1 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.body(self.bn0(self.stem(x)))
        return self.head(self.bn1(self.hidden(x.mean(dim=(2, 3)))))


@pytest.mark.parametrize(
    "act_w,scaling_factor,enable_ags,enable_dampen,track_ones",
    [
        ("ste", False, True, True, False),
        ("hardtanh", True, True, True, False),
        ("ste_v2", False, True, False, False),
        ("hardtanhv2", True, False, True, False),
        ("ste", True, False, False, False),
        ("ste_v2", True, True, True, True),
    ],
)
def test_model_training_matches_oracle(
    act_w, scaling_factor, enable_ags, enable_dampen, track_ones
):
    torch.manual_seed(0)
    model = TinyNet(act_w, scaling_factor)
    oracle = to_oracle(model)
    assert not any(isinstance(m, ovsw.nn.BinaryLayer) for m in oracle.modules())
    assert sum(isinstance(m, OracleConv2d) for m in oracle.modules()) == 3
    assert sum(isinstance(m, OracleLinear) for m in oracle.modules()) == 1
    assert model.state_dict().keys() == oracle.state_dict().keys()

    kw = dict(
        enable_ags=enable_ags,
        delta=0.04,
        enable_dampen=enable_dampen,
        dampen_weight=9e-4,
        track_momentum=0.9,
        track_threshold=0.05,
        track_ones=track_ones,
    )

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    opt = ovsw.OvSW(sgd(model), model, **kw)
    opt_o = OracleOvSW(sgd(oracle), oracle, **kw)
    assert model.state_dict().keys() == oracle.state_dict().keys()

    gen = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(4):
        x = torch.randn(4, 3, 8, 8, generator=gen)
        target = torch.randint(0, 5, (4,), generator=gen)
        losses = []
        for net, o in ((model, opt), (oracle, opt_o)):
            o.zero_grad()
            loss = loss_fn(net(x), target)
            loss.backward()
            o.step()
            losses.append(loss.item())
        assert math.isclose(losses[0], losses[1], rel_tol=1e-5), (step, losses)
        for s, so in zip(opt.stats(), opt_o.stats()):
            assert s["name"] == so["name"]
            if enable_ags:
                assert math.isclose(s["ags_ratio"], so["ags_ratio"], rel_tol=1e-4), (step, s, so)
            else:
                assert s["ags_ratio"] is None and so["ags_ratio"] is None
            if enable_dampen:
                assert s["silent_ratio"] == so["silent_ratio"], (step, s, so)
            else:
                assert s["silent_ratio"] is None and so["silent_ratio"] is None

    sd, sd_o = model.state_dict(), oracle.state_dict()
    assert sd.keys() == sd_o.keys()
    for k in sd:
        if sd[k].is_floating_point():
            assert_rel_close(sd[k], sd_o[k], 1e-4, k)
        else:
            assert torch.equal(sd[k], sd_o[k]), k
    silent = [s["silent_ratio"] for s in opt.stats()]
    if enable_dampen and not track_ones:
        # the silent masks were not all ones (some weights flipped) nor all zeros
        assert all(v > 0.0 for v in silent) and any(v < 1.0 for v in silent), silent
    elif enable_dampen:  # trackers started at ones: 0.9 ** 4 > tau, nothing silent yet
        assert all(v == 0.0 for v in silent), silent
