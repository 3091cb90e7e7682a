"""The fused CUDA kernels (src/cuda/) and the library's CUDA route.

The first tests run on any machine with a CUDA build of torch (which ships NVRTC): every
kernel compiles for sm_80 and sm_90 and the PTX declares every entry point; the route
counters leave CPU ops out; the generic backward rebuilds what a fused forward did not
keep. The tests marked ``cuda`` need a GPU and are skipped (not passed) without one:
``OvSWConv2d`` and ``OvSW`` themselves on the fused route against the CPU oracle
(``ovsw.testing``, float64) and against their own libtorch route, in float32, float16
and bfloat16, channels_last included, with the route counters showing that the kernels
ran; each fused pass against the oracle through ``_core.cuda_*``; the routes declined
where they must be; 20 AMP steps (fp16 and bf16) on both routes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ovsw
import ovsw.cuda
from ovsw import _core, testing
from ovsw.testing import fraction_outside, oracle_ags_sad, oracle_binary_conv2d, within

needs_nvrtc = pytest.mark.skipif(
    torch.version.cuda is None, reason="a CPU-only torch ships no NVRTC"
)

EXPECTED_FAMILIES = {
    "ovsw_sample_moments": 3,
    "ovsw_sign": 9,
    "ovsw_bireal_backward": 9,
    "ovsw_weight_prep": 9,
    "ovsw_weight_grad": 9,
    "ovsw_ags_sad_step": 1,
    "ovsw_ags_sad_finalize": 1,
}
OPS = ("conv_forward", "conv_backward", "ags_sad_step")


def test_entry_points_cover_every_op_and_dtype_pair():
    names = _core.cuda_entry_points()
    assert len(names) == len(set(names)) == sum(EXPECTED_FAMILIES.values())
    for fam, count in EXPECTED_FAMILIES.items():
        members = [n for n in names if n == fam or n.startswith(fam + "_")]
        if fam == "ovsw_ags_sad_step":
            members = [n for n in members if n == fam]
        assert len(members) == count, fam
    for a in ("f32", "f16", "bf16"):
        for b in ("f32", "f16", "bf16"):
            assert f"ovsw_sign_{a}_{b}" in names
            assert f"ovsw_bireal_backward_{a}_{b}" in names


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles(arch):
    res = ovsw.cuda.compile_kernels(arch)
    missing = [n for n, ok in res["entries"].items() if not ok]
    assert not missing, f"sm_{arch}: {missing}"
    assert f".target sm_{arch}" in res["ptx"]
    # Each entry point is a real kernel with parameters in the PTX, not just a name.
    for name in res["entries"]:
        assert f".entry {name}(" in res["ptx"], name
    assert res["cubin"][:4] == b"\x7fELF"


@needs_nvrtc
@pytest.mark.slow
def test_check_command_reports_every_kernel():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.cuda", "check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.startswith("NVRTC 1")
    for arch in (80, 90):
        assert f"sm_{arch}: compiled" in out
        for name in _core.cuda_entry_points():
            # Each kernel's line: present, then ptxas's registers, shared memory, spills.
            assert f"\n  ok   sm_{arch} {name} " in out, name
    if not torch.cuda.is_available():
        assert "no CUDA device: kernels compiled only, not run" in out


def test_check_rejects_a_bad_arch():
    with pytest.raises(ValueError, match="sm_XY"):
        _core.cuda_compile(7)


def test_switch_and_status():
    st = ovsw.cuda.status()
    assert st["enabled"] is ovsw.cuda.enabled()
    assert ("driver_version" in st) != ("driver_error" in st)
    was = ovsw.cuda.enabled()
    try:
        ovsw.cuda.set_enabled(False)
        assert not ovsw.cuda.enabled() and not ovsw.cuda.status()["enabled"]
        ovsw.cuda.set_enabled(True)
        assert ovsw.cuda.enabled()
        with ovsw.cuda.disabled():
            assert not ovsw.cuda.enabled()
        assert ovsw.cuda.enabled()
    finally:
        ovsw.cuda.set_enabled(was)


def test_explicit_kernels_refuse_cpu_tensors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        _core.cuda_binarize_activation(x, True, "float32")
    # With a stream given, the entry point itself declines and says why.
    with pytest.raises(RuntimeError, match="the input is a torch.float32 tensor on cpu"):
        _core.cuda_binarize_activation(x, True, "float32", stream=0)
    with pytest.raises(ValueError, match="dtype must be"):
        _core.cuda_binarize_activation(x, True, "float64", stream=0)


def test_cpu_ops_are_not_counted_on_the_cuda_route(net):
    """The counters count CUDA-route ops only: a CPU training step leaves them alone."""
    before = ovsw.cuda.route_counts()
    assert set(before) == set(OPS)
    assert all(set(c) == {"fused", "declined", "last_declined"} for c in before.values())
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, enable_ags=True)
    F.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert ovsw.cuda.route_delta(before) == dict.fromkeys(OPS, (0, 0))


def test_conv_mode_follows_autocast_and_the_tf32_setting():
    """What decides the fold (see src/conv/cuda.rs) is libtorch's own state of this
    thread: CUDA autocast and ``torch.backends.cudnn.conv.fp32_precision``."""
    conv = torch.backends.cudnn.conv
    was = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    precision = conv.fp32_precision
    try:
        conv.fp32_precision = "tf32"
        assert _core.cuda_conv_mode() == (None, True)
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        assert _core.cuda_conv_mode() == ("torch.bfloat16", True)
        conv.fp32_precision = "ieee"
        assert _core.cuda_conv_mode() == ("torch.bfloat16", False)
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("cuda", was[1])
        conv.fp32_precision = precision
    assert _core.cuda_conv_mode()[0] is None


@pytest.mark.parametrize("act_w", ["ste", "hardtanhv2"])
def test_backward_rebuilds_a_missing_conv_out(act_w):
    """A forward that folded the scale (the CUDA route) keeps no conv_out; the generic
    backward then recomputes conv(a, w_b) for the learnable scale's gradient, and gets
    what it gets from the kept one. With a bias it cannot (and never has to)."""
    torch.manual_seed(4)
    x = torch.randn(3, 4, 7, 7)
    w = torch.randn(6, 4, 3, 3)
    scale = _core.channel_abs_mean(w) * 1.5
    geo = ((2, 2), (1, 1), (1, 1), 1)
    y, std, alpha, conv_out = _core.binary_conv2d_forward(x, w, None, scale, act_w, *geo, True)
    # alpha absent (the learnable scale is used), conv_out kept
    assert alpha.shape == (0,) and conv_out.shape == y.shape
    absent = conv_out.new_empty(0)  # the absent marker, in the convolution's dtype
    g = torch.randn_like(y)
    needs = (True, True, False, True)
    kept = _core.binary_conv2d_backward(
        g, x, w, False, scale, std, alpha, conv_out, act_w, *geo, needs
    )
    rebuilt = _core.binary_conv2d_backward(
        g, x, w, False, scale, std, alpha, absent, act_w, *geo, needs
    )
    for a, b, n in zip(kept, rebuilt, needs):
        if not n:
            assert a.shape == (0,) and b.shape == (0,)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    # The scale's gradient only, as well.
    only = _core.binary_conv2d_backward(
        g, x, w, False, scale, std, alpha, absent, act_w, *geo, (False, False, False, True)
    )
    torch.testing.assert_close(only[3], kept[3], rtol=1e-6, atol=1e-6)
    assert all(t.shape == (0,) for t in only[:3])
    assert kept[3].abs().max() > 0.1  # a real gradient, not zeros on both sides
    with pytest.raises(ValueError, match="missing conv_out"):
        _core.binary_conv2d_backward(g, x, w, True, scale, std, alpha, absent, act_w, *geo, needs)


# ---------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------
gpu = pytest.mark.cuda


@pytest.fixture(autouse=True)
def ieee_float32_convs():
    """cuDNN runs float32 convolutions in TF32 by default (an 11-bit significand), which
    would swamp the float32 tolerances below in either route; the tests ask for IEEE
    float32 (the TF32 case has its own test)."""
    conv = torch.backends.cudnn.conv
    was = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = was


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Largest error relative to the reference's largest magnitude.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(got, ref):
    """max |got - ref| / max |ref| (``inf`` where got holds a NaN or inf ref does not)."""
    return testing.rel_err(got, ref, floor=1e-30)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rel_err_refuses_a_nonfinite_result(bad):
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16)
    got = ref.clone()
    assert rel_err(got, ref) == 0.0
    got[1] = bad
    assert not within(rel_err(got, ref), TOL[torch.bfloat16])
    # the tracker check: a NaN or inf counts among the elements that moved
    assert fraction_outside(got, ref, atol=1e-6) == pytest.approx(1 / 3)


@gpu
def test_every_kernel_matches_the_libtorch_path():
    rows = ovsw.cuda.compare_on_gpu()
    assert len(rows) > 100
    bad = [r for r in rows if not within(r[2], r[3])]
    assert not bad, bad


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_passes_match_the_oracle(dtype, channels_last):
    torch.manual_seed(0)
    x64 = torch.randn(5, 12, 7, 9, dtype=torch.float64) * 0.8 + 0.3
    x = x64.to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, std = _core.cuda_binarize_activation(x, True, "float32")
    ref_std = (x.double().cpu().var(dim=(1, 2, 3), keepdim=True) + 1e-5).sqrt()
    assert rel_err(std, ref_std) <= TOL[dtype]
    assert a.stride() == x.stride()  # written in x's layout, no copy
    assert torch.equal(a.cpu(), (x.double().cpu() / ref_std).sign().float())
    g = torch.randn(5, 12, 7, 9, dtype=torch.float64)
    gx = _core.cuda_bireal_backward(g.to("cuda", dtype), x, std)
    xh = x.double().cpu() / std.double().cpu()
    ref = g.to(dtype).double() * (2 - 2 * xh.abs()).clamp_min(0) / std.double().cpu()
    assert rel_err(gx, ref) <= 4 * TOL[dtype]
    assert gx.stride() == x.stride()
    # A wrong answer falls outside: the surrogate without / std.
    assert rel_err(gx, ref * std.double().cpu()) > 10 * TOL[dtype]


def _conv_case(act_w, scaling_factor, dtype, channels_last=False):
    torch.manual_seed(1)
    conv = ovsw.OvSWConv2d(
        8, 12, 3, stride=2, padding=1, groups=2, act_w=act_w, scaling_factor=scaling_factor
    )
    x = torch.randn(3, 8, 9, 9, dtype=torch.float64)
    g = torch.randn(3, 12, 5, 5, dtype=torch.float64)
    gpu = copy.deepcopy(conv).to("cuda", dtype)
    xg = x.to("cuda", dtype)
    if channels_last:
        gpu = gpu.to(memory_format=torch.channels_last)
        xg = xg.contiguous(memory_format=torch.channels_last)
    return gpu, xg, g


def _run_layer(layer, x, g):
    xi = x.detach().clone().requires_grad_(True)
    y = layer(xi)
    grads = torch.autograd.grad(y, [xi, *layer.parameters()], g.to("cuda", y.dtype))
    return [y, *grads]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_w", ["ste", "hardtanh", "ste_v2", "hardtanhv2"])
@pytest.mark.parametrize("scaling_factor", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_layer_on_the_fused_route_matches_oracle_and_libtorch(
    dtype, act_w, scaling_factor, channels_last
):
    gpu, xg, g = _conv_case(act_w, scaling_factor, dtype, channels_last)
    # CPU oracle in float64 on the same (rounded) parameters.
    params = [p.detach().double().cpu().requires_grad_(True) for p in gpu.parameters()]
    x64 = xg.detach().double().cpu().requires_grad_(True)
    w64 = params[0]
    s64 = params[1] if scaling_factor else None
    y_ref = oracle_binary_conv2d(x64, w64, None, s64, act_w, 2, 1, 1, 2, True)
    ref = [y_ref, *torch.autograd.grad(y_ref, [x64, *params], g)]

    before = ovsw.cuda.route_counts()
    fused = _run_layer(gpu, xg, g)
    delta = ovsw.cuda.route_delta(before)
    assert delta["conv_forward"] == (1, 0), ovsw.cuda.route_counts()["conv_forward"]
    assert delta["conv_backward"] == (1, 0), ovsw.cuda.route_counts()["conv_backward"]
    before = ovsw.cuda.route_counts()
    with ovsw.cuda.disabled():
        lib = _run_layer(gpu, xg, g)
    assert ovsw.cuda.route_delta(before)["conv_forward"] == (0, 1)
    assert ovsw.cuda.route_counts()["conv_forward"]["last_declined"] == (
        "the CUDA kernels are turned off"
    )
    for got, lb, orc in zip(fused, lib, ref):
        assert got.dtype == lb.dtype and got.shape == lb.shape
        assert rel_err(got, lb) <= 20 * TOL[dtype]
        assert rel_err(got, orc) <= 20 * TOL[dtype] + (0.05 if dtype != torch.float32 else 0)
    if channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)


@gpu
def test_the_fused_route_declines_what_it_does_not_cover():
    """Declined cases run the libtorch route and are counted with their reason; float64
    never reaches the CUDA route."""
    torch.manual_seed(5)
    cases = {
        "a learnable scaling_factor together with a bias": ovsw.OvSWConv2d(
            4, 6, 3, padding=1, bias=True, scaling_factor=True
        ).cuda(),
        "is not dense with the batch dim outermost": ovsw.OvSWConv2d(4, 6, 3, padding=1).cuda(),
    }
    x = torch.randn(2, 4, 6, 12, device="cuda")
    for reason, layer in cases.items():
        xi = x[..., ::2] if "dense" in reason else x  # a strided view
        before = ovsw.cuda.route_counts()
        y = layer(xi)
        assert ovsw.cuda.route_delta(before)["conv_forward"] == (0, 1)
        assert reason in ovsw.cuda.route_counts()["conv_forward"]["last_declined"]
        with ovsw.cuda.disabled():
            torch.testing.assert_close(layer(xi), y, rtol=1e-6, atol=1e-6)
    before = ovsw.cuda.route_counts()
    layer = ovsw.OvSWConv2d(4, 6, 3, padding=1).cuda().double()
    layer(x.double())
    assert ovsw.cuda.route_delta(before) == dict.fromkeys(OPS, (0, 0))


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_ags_sad_on_the_fused_route_matches_the_oracle(dtype):
    torch.manual_seed(2)
    cfg = dict(
        enable_ags=True,
        delta=0.5,
        enable_dampen=True,
        dampen_weight=1e-3,
        track_momentum=0.9,
        track_threshold=0.05,
    )
    shapes = [(16, 8, 3, 3), (4, 16, 1, 1), (32, 4, 3, 3)]
    layers = []
    for s in shapes:
        w = torch.randn(s, dtype=torch.float64) * 0.1
        layers.append(
            {
                "grad": torch.randn(s, dtype=torch.float64) * 0.01,
                "weight": w,
                "tracker": torch.rand(s, dtype=torch.float64) * 0.1,
                "prev": torch.where(torch.rand(s) < 0.3, -w, w),
            }
        )
    gpu = [{k: v.to("cuda", dtype) for k, v in d.items()} for d in layers]
    ref = [{k: v.to(dtype).double() for k, v in d.items()} for d in layers]
    before = ovsw.cuda.route_counts()
    figures = _core.ags_sad_step(
        _core.OvSWConfig(**cfg),
        [d["grad"] for d in gpu],
        [d["weight"] for d in gpu],
        [d["tracker"] for d in gpu],
        [d["prev"] for d in gpu],
    )
    assert ovsw.cuda.route_delta(before)["ags_sad_step"] == (1, 0)
    assert figures.shape == (3, 2) and figures.dtype == torch.float64
    assert figures.device.type == "cuda"
    for i, (got, r) in enumerate(zip(gpu, ref)):
        ags, silent = oracle_ags_sad(r["grad"], r["weight"], r["tracker"], r["prev"], **cfg)
        assert figures[i, 0].item() == pytest.approx(ags, rel=1e-5)
        assert figures[i, 1].item() == pytest.approx(silent, abs=2 / r["weight"].numel())
        for k in ("grad", "tracker", "prev"):
            assert rel_err(got[k], r[k]) <= 4 * TOL[dtype], k
    # Disabled parts report NaN.
    off = _core.ags_sad_step(
        _core.OvSWConfig(enable_ags=True),
        [d["grad"] for d in gpu],
        [d["weight"] for d in gpu],
        [None] * 3,
        [None] * 3,
    )
    assert torch.isnan(off[:, 1]).all() and not torch.isnan(off[:, 0]).any()


@gpu
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_twenty_amp_steps_match_the_libtorch_route(amp_dtype):
    import contextlib

    from conftest import tiny_net

    torch.manual_seed(3)
    base = tiny_net().cuda()
    args = dict(enable_ags=True, delta=0.2, enable_dampen=True, dampen_weight=1e-3)
    data = [
        (torch.randn(16, 3, 16, 16).cuda(), torch.randint(0, 4, (16,)).cuda()) for _ in range(4)
    ]
    results = {}
    for route, ctx in (("fused", contextlib.nullcontext), ("libtorch", ovsw.cuda.disabled)):
        net = copy.deepcopy(base)
        opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9), net, **args)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        before = ovsw.cuda.route_counts()
        with ctx():
            for step in range(20):
                x, y = data[step % len(data)]
                with torch.autocast("cuda", dtype=amp_dtype):
                    loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        delta = ovsw.cuda.route_delta(before)
        if route == "fused":
            assert delta["conv_forward"] == delta["conv_backward"] == (40, 0)
            # fp16 GradScaler may skip a step on an overflow; it never reaches OvSW then.
            assert delta["ags_sad_step"][1] == 0 and delta["ags_sad_step"][0] >= 15
        else:
            assert all(fused == 0 for fused, _ in delta.values())
        results[route] = (net, opt.stats())
    (fnet, fstats), (lnet, lstats) = results["fused"], results["libtorch"]
    moved = 0.0
    for (name, f), l0, b in zip(
        fnet.state_dict().items(), lnet.state_dict().values(), base.state_dict().values()
    ):
        if name.endswith("tracker"):
            # A weight whose sign flips in one run and not the other moves its tracker
            # by (1 - m); allow that for a few elements only.
            assert fraction_outside(f, l0, atol=1e-6) <= 0.02, name
        elif f.is_floating_point():
            assert rel_err(f, l0) <= 2e-2, name
            if name.endswith("weight") and f.dim() == 4:
                moved = max(moved, rel_err(f, b))
    assert moved > 0.1  # the tolerance above is small next to how far training moved them
    for a, b in zip(fstats, lstats):
        assert a["ags_ratio"] == pytest.approx(b["ags_ratio"], rel=2e-2)
        assert a["silent_ratio"] == pytest.approx(b["silent_ratio"], abs=2e-2)


@gpu
def test_a_fused_training_step_makes_no_host_sync_and_eval_matches():
    """Forward, backward and OvSW.step on the fused route raise nothing under
    ``torch.cuda.set_sync_debug_mode("error")``; an eval-mode forward (sign(x), no std)
    takes the fused route too and matches the libtorch route."""
    from conftest import tiny_net

    torch.manual_seed(6)
    net = tiny_net().cuda()
    opt = ovsw.OvSW(
        torch.optim.SGD(net.parameters(), lr=0.1), net, enable_ags=True, enable_dampen=True
    )
    x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.randint(0, 4, (8,), device="cuda")

    def step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up: compiles the kernels, fills the allocators' caches
    torch.cuda.synchronize()
    before = ovsw.cuda.route_counts()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    delta = ovsw.cuda.route_delta(before)
    assert delta == {"conv_forward": (2, 0), "conv_backward": (2, 0), "ags_sad_step": (1, 0)}
    net.eval()
    with torch.no_grad():
        before = ovsw.cuda.route_counts()
        fused = net(x)
        assert ovsw.cuda.route_delta(before)["conv_forward"] == (2, 0)
        with ovsw.cuda.disabled():
            lib = net(x)
    assert rel_err(fused, lib) <= 1e-4


@gpu
@pytest.mark.parametrize("act_w", ["ste", "hardtanh"])
def test_under_tf32_the_forward_does_not_fold_the_scale(act_w):
    """With cuDNN's default TF32, folding ``w_b * s`` would round the scale to 11 bits
    (errors near 1e-4); the fused forward scales the output instead and stays as exact
    as the libtorch route, whose ``sign`` operands TF32 holds exactly."""
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # the fixture restores it
    torch.manual_seed(7)
    layer = ovsw.OvSWConv2d(16, 24, 3, padding=1, act_w=act_w).cuda()
    x = torch.randn(4, 16, 12, 12, device="cuda")
    before = ovsw.cuda.route_counts()
    fused = layer(x)
    assert ovsw.cuda.route_delta(before)["conv_forward"] == (1, 0)
    with ovsw.cuda.disabled():
        lib = layer(x)
    assert rel_err(fused, lib) <= 1e-5
