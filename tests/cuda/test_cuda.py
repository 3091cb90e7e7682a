"""CUDA: the op, AGS/SAD and an AMP step run through libtorch's CUDA kernels and agree
with the CPU. Skipped (not passed) on machines without a GPU."""

import copy

import pytest
import torch
import torch.nn.functional as F

import ovsw
from conftest import tiny_net

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def ieee_float32_convs():
    """cuDNN runs float32 convolutions in TF32 by default (an 11-bit significand), which
    would swamp the 1e-4 tolerances below; the comparisons ask for IEEE float32."""
    conv = torch.backends.cudnn.conv
    was = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = was


OVSW = dict(enable_ags=True, delta=0.5, enable_dampen=True, dampen_weight=1e-3)


@pytest.mark.parametrize("act_w", ["ste", "hardtanh", "ste_v2", "hardtanhv2"])
@pytest.mark.parametrize("scaling_factor", [False, True])
def test_op_matches_cpu(act_w, scaling_factor):
    torch.manual_seed(0)
    cpu = ovsw.OvSWConv2d(
        8,
        12,
        3,
        stride=2,
        padding=1,
        groups=2,
        bias=True,
        act_w=act_w,
        scaling_factor=scaling_factor,
    )
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(3, 8, 9, 9)
    g = torch.randn(3, 12, 5, 5)
    outs = []
    for layer, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xi = x.to(dev).requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi, *layer.parameters()], g.to(dev))
        outs.append([y, *grads])
    for a, b in zip(*outs):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_ags_sad_matches_cpu():
    torch.manual_seed(0)
    cpu = tiny_net()
    gpu = copy.deepcopy(cpu).cuda()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    stats = []
    for net, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1), net, **OVSW)
        for _ in range(3):
            loss = F.cross_entropy(net(x.to(dev)), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats.append(opt.stats())
    for (k, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=k)
    for a, b in zip(*stats):
        assert a["ags_ratio"] == pytest.approx(b["ags_ratio"], rel=1e-3)
        assert a["silent_ratio"] == pytest.approx(b["silent_ratio"], abs=1e-3)


def test_amp_fp16_step():
    torch.manual_seed(0)
    net = tiny_net().cuda()
    opt = ovsw.OvSW(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), net, **OVSW)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(16, 3, 16, 16).cuda(), torch.randint(0, 4, (16,)).cuda()
    w0 = net[2].weight.detach().clone()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            inner = net[:3](x)
            loss = F.cross_entropy(net(x), y)
        assert inner.dtype == torch.float32  # fp16 conv, fp32 per-channel scale
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    assert net[2].weight.grad.dtype == torch.float32
    assert not torch.equal(net[2].weight, w0)
    assert all(s["silent_ratio"] is not None for s in opt.stats())
