"""OvSW behaves as a torch optimizer: groups, state, state_dict, schedulers, GradScaler."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ovsw
from conftest import tiny_net

OVSW = dict(enable_ags=True, delta=0.5, enable_dampen=True, dampen_weight=1e-3)


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(model, opt, seed=0):
    x, y = batch(seed)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_wraps_groups_and_state(net):
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = ovsw.OvSW(sgd, net, **OVSW)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is sgd.param_groups
    train_step(net, opt)
    assert opt.state is sgd.state and len(opt.state) == len(list(net.parameters()))
    opt.param_groups[0]["lr"] = 0.01
    assert sgd.param_groups[0]["lr"] == 0.01


def test_step_transforms_grads_then_updates(net):
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = ovsw.OvSW(sgd, net, **OVSW)
    x, y = batch()
    F.cross_entropy(net(x), y).backward()
    convs = ovsw.binary_convs(net)
    raw = [m.weight.grad.clone() for _, m in convs]
    before = [m.weight.detach().clone() for _, m in convs]
    opt.step()
    for (_, m), g0, w0 in zip(convs, raw, before):
        assert not torch.equal(m.weight.grad, g0), "AGS/SAD should change the binary grads"
        # plain SGD: the update uses the transformed gradient left in .grad
        torch.testing.assert_close(m.weight.detach(), w0 - 0.1 * m.weight.grad)
        torch.testing.assert_close(m.weight_prev, w0)


def test_stats_in_model_order(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    assert opt.stats() == []
    train_step(net, opt)
    stats = opt.stats()
    assert [s["name"] for s in stats] == ["2", "5"]
    for s in stats:
        assert set(s) == {"name", "ags_ratio", "silent_ratio"}
        assert s["ags_ratio"] > 0 and 0.0 <= s["silent_ratio"] <= 1.0
    # first step after set-up: weight_prev == W, no flips, every tracker 0 < tau: all silent
    assert all(s["silent_ratio"] == 1.0 for s in stats)


def test_disabled_parts_report_none(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, enable_ags=True)
    train_step(net, opt)
    assert all(s["silent_ratio"] is None and s["ags_ratio"] > 0 for s in opt.stats())
    assert all(m.tracker is None for _, m in ovsw.binary_convs(net))


def test_state_dict_round_trip(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, **OVSW)
    train_step(net, opt)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    net2 = copy.deepcopy(net)
    opt2 = ovsw.OvSW(torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9), net2, **OVSW)
    opt2.load_state_dict(copy.deepcopy(sd))  # torch hands out live state tensors
    train_step(net, opt, seed=1)
    train_step(net2, opt2, seed=1)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k


def test_lr_scheduler_accepts_it(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(net, opt)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_closure(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and len(opt.stats()) == 2


@pytest.mark.parametrize("inner", ["adam", "adamw", "rmsprop"])
def test_wraps_other_optimizers(inner):
    torch.manual_seed(0)
    net = tiny_net()
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
    opt = ovsw.OvSW(cls[inner](net.parameters(), lr=1e-3), net, **OVSW)
    w0 = net[2].weight.detach().clone()
    train_step(net, opt)
    assert not torch.equal(net[2].weight, w0)


def test_grad_scaler_skipped_step_keeps_sad_state(net):
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = ovsw.OvSW(sgd, net, **OVSW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    train_step(net, opt)  # trackers now hold something
    # BatchNorm running stats move in any train-mode forward; parameters and SAD must not.
    watched = [k for k in net.state_dict() if "running" not in k and "num_batches" not in k]
    state = {k: net.state_dict()[k].clone() for k in watched}
    x, y = batch(1)
    scaler.scale(F.cross_entropy(net(x), y)).backward()
    net[2].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    now = net.state_dict()
    assert any(k.endswith("tracker") for k in watched)
    for k in watched:
        assert torch.equal(now[k], state[k]), f"{k} changed on a skipped step"
    assert scaler.get_scale() < 2.0**4


def test_grad_scaler_step_sees_unscaled_grads(net):
    # With AGS off and SAD on, the final grad is raw + lambda*M*W; after unscale_ the raw
    # grad must be the unscaled one, so scaled and unscaled runs agree.
    def run(scale):
        torch.manual_seed(0)
        m = tiny_net()
        opt = ovsw.OvSW(torch.optim.SGD(m.parameters(), lr=0.1), m, **OVSW)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        x, y = batch()
        opt.zero_grad()
        scaler.scale(F.cross_entropy(m(x), y)).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        return m.state_dict()

    a, b = run(1.0), run(2.0**10)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_track_ones_and_reset(net):
    ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, enable_dampen=True, track_ones=True)
    layer = net[2]
    assert torch.equal(layer.tracker, torch.ones_like(layer.weight))
    with torch.no_grad():
        layer.weight.add_(1.0)
    layer.reset_sad()
    assert torch.equal(layer.weight_prev, layer.weight.detach())


def test_bfloat16_autocast_step_on_cpu(net):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net[:3](x)
        loss = F.cross_entropy(net(x), y)
    assert out.dtype == torch.float32  # conv ran in bf16, the fp32 scale promotes back
    opt.zero_grad()
    loss.backward()
    for _, m in ovsw.binary_convs(net):
        assert m.weight.grad.dtype == torch.float32 and torch.isfinite(m.weight.grad).all()
    opt.step()


@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_autocast_matches_fp32_on_representable_input(training):
    # On a bf16-representable input the signs are the same in both precisions and the
    # +-1 sums are exact in bf16, so the autocast forward equals the fp32 one; the
    # backward differs only by bf16 rounding of the incoming gradient.
    torch.manual_seed(0)
    layer = ovsw.OvSWConv2d(8, 6, 3, padding=1).train(training)
    x = torch.randn(2, 8, 7, 7).bfloat16().float().requires_grad_(True)
    g = torch.randn(2, 6, 7, 7)
    ref = layer(x)
    (gx_ref, gw_ref) = torch.autograd.grad(ref, (x, layer.weight), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    gx, gw = torch.autograd.grad(low, (x, layer.weight), g)
    torch.testing.assert_close(low, ref, rtol=1e-6, atol=1e-6)
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2 * gx_ref.abs().max().item())
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=2e-2 * gw_ref.abs().max().item())


# -- the figures stay on the device (issue 11) ------------------------------------------
PARTS = [
    dict(enable_ags=True, enable_dampen=True, dampen_weight=1e-3),
    dict(enable_ags=True),
    dict(enable_dampen=True, dampen_weight=1e-3),
    dict(),
]


def _core_layers(dtype, device="cpu", shapes=((4, 3, 3, 3), (6, 4, 1, 1))):
    g = torch.Generator().manual_seed(0)
    layers = []
    for shape in shapes:
        w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        prev = torch.where(torch.rand(shape, generator=g) < 0.3, -w, w)
        tracker = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype) * 1e-3
        layers.append([t.to(device) for t in (grad, w, tracker, prev)])
    return layers


def _step(cfg, layers):
    return ovsw._core.ags_sad_step(cfg, *[[lyr[i] for lyr in layers] for i in range(4)])


@pytest.mark.parametrize("parts", PARTS, ids=["both", "ags", "sad", "neither"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "generic"])
def test_figures_are_one_float64_tensor_nan_where_disabled(parts, dtype):
    cfg = ovsw._core.OvSWConfig(**parts)
    layers = _core_layers(dtype)
    weights = [lyr[1].double().clone() for lyr in layers]
    grads = [lyr[0].double().clone() for lyr in layers]
    prevs = [lyr[3].clone() for lyr in layers]
    trackers = [lyr[2].double().clone() for lyr in layers]
    figures = _step(cfg, layers)
    assert isinstance(figures, torch.Tensor)
    assert figures.shape == (2, 2) and figures.dtype == torch.float64
    assert figures.device == layers[0][1].device
    for i, (w, g, p, t) in enumerate(zip(weights, grads, prevs, trackers)):
        ags, silent = figures[i].tolist()
        if cfg.enable_ags:
            o = w.shape[0]
            r = g.reshape(o, -1).norm(dim=1).clamp_min(1e-6) / w.reshape(o, -1).norm(
                dim=1
            ).clamp_min(1e-3)
            assert ags == pytest.approx(r.mean().item(), rel=1e-5)
        else:
            assert math.isnan(ags)
        if cfg.enable_dampen:
            flipped = (torch.sign(w) != torch.sign(p.double())).double()
            t_new = cfg.track_momentum * t + (1 - cfg.track_momentum) * flipped
            expected = (t_new < cfg.track_threshold).double().mean().item()
            assert silent == pytest.approx(expected, abs=1e-12)
            assert 0.0 < expected < 1.0  # the case is not trivial
        else:
            assert math.isnan(silent)


def test_figures_of_no_layers():
    figures = ovsw._core.ags_sad_step(ovsw._core.OvSWConfig(enable_ags=True), [], [], [], [])
    assert figures.shape == (0, 2) and figures.dtype == torch.float64


def test_layers_on_two_devices_are_refused():
    layers = _core_layers(torch.float64)
    layers[1] = [t.to("meta") for t in layers[1]]
    with pytest.raises(ValueError, match="one step runs on one device"):
        _step(ovsw._core.OvSWConfig(**OVSW), layers)


@pytest.mark.parametrize("parts", PARTS, ids=["both", "ags", "sad", "neither"])
def test_generic_step_makes_no_host_copy(parts):
    """Meta tensors have no elements, so any copy to the host (``.item()``,
    ``.tolist()``, ``.to("cpu")``, tch's ``copy_data``) fails on them: the generic
    step running on meta tensors shows that it never copies a figure to the host."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.zeros(2, device="meta").cpu()
    layers = _core_layers(torch.float32, device="meta")
    figures = _step(ovsw._core.OvSWConfig(**parts), layers)
    assert figures.device.type == "meta"
    assert figures.shape == (2, 2) and figures.dtype == torch.float64


def test_ovsw_step_leaves_the_figures_on_the_device():
    """A whole OvSW step on a meta model: forward, backward, AGS+SAD and SGD run, and
    nothing reads the figures until stats() is called."""
    torch.manual_seed(0)
    net = tiny_net().to("meta")
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    x = torch.randn(6, 3, 8, 8, device="meta")
    loss = net(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with pytest.raises((RuntimeError, NotImplementedError)):
        opt.stats()  # the one conversion, and meta tensors have nothing to convert


def test_stats_convert_once_per_step(net, monkeypatch):
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    train_step(net, opt)
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    first = opt.stats()
    assert opt.mean_silent_ratio() == pytest.approx(
        sum(s["silent_ratio"] for s in first) / len(first)
    )
    assert opt.stats() == first and len(calls) == 1
    train_step(net, opt, seed=1)
    assert len(calls) == 1  # step() itself converts nothing
    opt.stats()
    assert len(calls) == 2


@pytest.mark.cuda
def test_cuda_step_does_not_synchronize():
    torch.manual_seed(0)
    net = tiny_net().cuda()
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
    x, y = (t.cuda() for t in batch())
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = opt.stats()
    assert all(s["ags_ratio"] > 0 and 0.0 <= s["silent_ratio"] <= 1.0 for s in stats)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ags_takes_its_norms_in_float32(dtype):
    """AGS on half-precision weights (the libtorch route) against float64: gradients near
    1e-4, whose squares underflow in float16 (below about 6e-8), must still give the exact
    factor delta * ||W_o|| / ||G_o||; each element is then one half-precision rounding
    from the float64 answer (2^-9 relative for bfloat16, 2^-12 for float16, with room;
    before the fix, float16 was 0.63 off and bfloat16 1.2e-2)."""
    from ovsw.testing import elementwise_rel_err, rel_err

    g = torch.Generator().manual_seed(0)
    shape = (8, 16, 3, 3)
    w = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.05).to(dtype)
    grad = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-4).to(dtype)
    tracker, prev = torch.zeros(shape, dtype=dtype), w.clone()
    delta = 0.1
    # float64 from the same half-precision inputs.
    w64, g64 = w.double().reshape(8, -1), grad.double().reshape(8, -1)
    gn = g64.norm(dim=1).clamp_min(1e-6)
    wn = w64.norm(dim=1).clamp_min(1e-3)
    r = gn / wn
    assert (r < delta).all(), "every channel is boosted: the case tests the factor"
    want = (g64 * (delta * wn / gn)[:, None]).reshape(shape)
    figures = _step(ovsw._core.OvSWConfig(enable_ags=True, delta=delta), [[grad, w, tracker, prev]])
    tol = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    # Below the smallest normal number, the rounding is absolute: the floor is that number.
    assert elementwise_rel_err(grad, want, floor=torch.finfo(dtype).tiny) <= tol
    assert rel_err(figures[0, 0], r.mean()) <= 1e-5
