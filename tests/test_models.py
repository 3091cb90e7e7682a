"""The architectures of SPEC section 4: state_dict layout against the upstream fixture,
forward/backward, loading upstream checkpoints, the binary-conv options and the init."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ovsw
from ovsw import OvSWConv2d
from ovsw.testing import max_abs_err, rel_err, within

DATA = Path(__file__).parent / "data" / "upstream_state_dict_keys.json"
UPSTREAM = json.loads(DATA.read_text())
SAD_SUFFIXES = (".tracker", ".weight_prev")

CIFAR = ["cResNet20_1w1a", "cResNet18_1w1a", "VGGSmall_1w1a"]
IMAGENET = ["ResNet18_1w1a", "ResNet34_1w1a"]
ARCHS = CIFAR + IMAGENET

# Binary conv counts per SPEC section 4 (cResNet18: 16 3x3 + 3 shortcut 1x1).
BINARY_COUNT = {
    "cResNet20_1w1a": 18,
    "cResNet18_1w1a": 19,
    "VGGSmall_1w1a": 5,
    "ResNet18_1w1a": 16,
    "ResNet34_1w1a": 32,
}
# Full-precision convs (stems, downsample convs, the 1x1 conv head of cResNet18).
FP_CONVS = {
    "cResNet20_1w1a": ["conv1"],
    "cResNet18_1w1a": ["conv1", "fc"],
    "VGGSmall_1w1a": ["conv0"],
    "ResNet18_1w1a": [
        "conv1",
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ],
    "ResNet34_1w1a": [
        "conv1",
        "layer2.0.downsample.0",
        "layer3.0.downsample.0",
        "layer4.0.downsample.0",
    ],
}
HEAD = {
    "cResNet20_1w1a": "linear.weight",
    "cResNet18_1w1a": "fc.weight",
    "VGGSmall_1w1a": "fc.weight",
    "ResNet18_1w1a": "fc.weight",
    "ResNet34_1w1a": "fc.weight",
}


def is_sad_key(key: str) -> bool:
    return key.endswith(SAD_SUFFIXES)


def expected_layout(arch: str, sad: bool = True) -> list:
    return [(k, list(s)) for k, s in UPSTREAM[arch].items() if sad or not is_sad_key(k)]


def layout(model: nn.Module) -> list:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def build(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return ovsw.models.create(arch, **kwargs)


def setup_sad(model: nn.Module) -> nn.Module:
    for _, m in ovsw.binary_convs(model):
        m.setup_sad()
    return model


def wrap(model: nn.Module) -> ovsw.OvSW:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return ovsw.OvSW(sgd, model, enable_dampen=True, dampen_weight=1e-4, enable_ags=True)


# -- the fixture itself ---------------------------------------------------------------


def test_fixture_covers_the_five_archs():
    assert sorted(UPSTREAM) == sorted(ARCHS)
    assert sorted(ovsw.models.names()) == sorted(ARCHS)
    assert len(ovsw.models.names()) == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_binary_conv_count(arch):
    # Each binary conv has exactly one tracker and one weight_prev in the fixture.
    trackers = [k for k in UPSTREAM[arch] if k.endswith(".tracker")]
    prevs = [k for k in UPSTREAM[arch] if k.endswith(".weight_prev")]
    assert len(trackers) == len(prevs) == BINARY_COUNT[arch]


# -- 1. state_dict layout -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_layout(arch):
    model = build(arch)
    # Without SAD: the fixture minus tracker/weight_prev, in the same order.
    assert layout(model) == expected_layout(arch, sad=False)
    # SAD set up layer by layer: exactly the fixture.
    setup_sad(model)
    assert layout(model) == expected_layout(arch, sad=True)


@pytest.mark.parametrize("arch", ["cResNet20_1w1a", "VGGSmall_1w1a", "ResNet18_1w1a"])
def test_state_dict_layout_with_optimizer(arch):
    model = build(arch)
    wrap(model)
    assert layout(model) == expected_layout(arch, sad=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_num_classes_match_fixture(arch):
    # The fixture was built with 10 classes (CIFAR) and 1000 (ImageNet).
    classes = UPSTREAM[arch][HEAD[arch]][0]
    assert classes == (10 if arch in CIFAR else 1000)
    model = build(arch)
    assert model.state_dict()[HEAD[arch]].shape[0] == classes


# -- 2. forward and backward ----------------------------------------------------------


@pytest.mark.parametrize(
    "arch,size",
    [
        ("cResNet20_1w1a", 32),
        ("cResNet18_1w1a", 32),
        ("VGGSmall_1w1a", 32),
        ("ResNet18_1w1a", 64),
        ("ResNet34_1w1a", 32),
    ],
)
def test_forward_backward(arch, size):
    model = build(arch, num_classes=7)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    y = torch.tensor([1, 5])
    model.train()
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    loss = F.cross_entropy(out, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    assert out_eval.shape == (2, 7)
    assert torch.isfinite(out_eval).all()


def test_imagenet_resolution_eval_batch_of_one():
    model = build("ResNet18_1w1a").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_cresnet20_pad_shortcut():
    from ovsw.models.cifar_resnet import PadShortcut

    block = build("cResNet20_1w1a").layer2[0]
    assert isinstance(block.shortcut, PadShortcut)
    assert list(block.shortcut.parameters()) == []
    assert list(block.shortcut.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    # 8 zero channels on each side, the 2x2 average of x in the middle.
    manual = x.reshape(2, 16, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(out[:, 8:24], manual)
    assert torch.equal(out[:, :8], torch.zeros(2, 8, 4, 4))
    assert torch.equal(out[:, 24:], torch.zeros(2, 8, 4, 4))


# -- 3. loading upstream checkpoints -----------------------------------------------------


def upstream_like_state_dict(arch: str) -> dict:
    """A state_dict with upstream's layout (SAD set up) and random values throughout."""
    model = setup_sad(build(arch, seed=123))
    gen = torch.Generator().manual_seed(7)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        else:
            out[k] = torch.randint(1, 1000, v.shape, generator=gen, dtype=v.dtype)
    if arch in CIFAR or arch == "ResNet18_1w1a":
        # The random tensors are not the model's own values.
        assert not torch.equal(out[HEAD[arch]], model.state_dict()[HEAD[arch]])
    return out


def assert_loaded(model: nn.Module, source: dict, skip_sad: bool = False) -> None:
    got = model.state_dict()
    for k, v in source.items():
        if skip_sad and is_sad_key(k):
            continue
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    "arch", ["cResNet20_1w1a", "cResNet18_1w1a", "VGGSmall_1w1a", "ResNet18_1w1a"]
)
def test_load_upstream_state_dict(arch):
    source = upstream_like_state_dict(arch)
    without_sad = {k: v for k, v in source.items() if not is_sad_key(k)}
    assert len(without_sad) == len(source) - 2 * BINARY_COUNT[arch]

    # (a) with SAD keys, into a fresh model that has no optimizer (hence no SAD state).
    model = build(arch, seed=1)
    model.load_state_dict(source, strict=True)
    assert_loaded(model, source)
    assert layout(model) == expected_layout(arch, sad=True)

    # (b) with SAD keys, into a fresh model wrapped by OvSW (SAD set up first).
    model = build(arch, seed=2)
    opt = wrap(model)
    model.load_state_dict(source, strict=True)
    assert_loaded(model, source)
    assert layout(model) == expected_layout(arch, sad=True)
    assert len(opt.layers) == BINARY_COUNT[arch]

    # (a') without SAD keys, into a fresh model without optimizer: no SAD state appears.
    model = build(arch, seed=3)
    model.load_state_dict(without_sad, strict=True)
    assert_loaded(model, without_sad)
    assert layout(model) == expected_layout(arch, sad=False)

    # (b') without SAD keys, into a model wrapped by OvSW: SAD restarts from the loaded
    # weight (weight_prev = W, tracker = zeros).
    model = build(arch, seed=4)
    wrap(model)
    model.load_state_dict(without_sad, strict=True)
    assert_loaded(model, without_sad)
    assert layout(model) == expected_layout(arch, sad=True)
    for name, conv in ovsw.binary_convs(model):
        assert torch.equal(conv.weight_prev, source[name + ".weight"]), name
        assert torch.equal(conv.weight_prev, conv.weight.detach()), name
        assert torch.equal(conv.tracker, torch.zeros_like(conv.weight)), name


def test_load_with_sad_then_step():
    # A checkpoint with SAD state, loaded into an OvSW-wrapped model, trains on.
    arch = "cResNet20_1w1a"
    source = upstream_like_state_dict(arch)
    source = {k: (v.abs() * 1e-3 if k.endswith(".tracker") else v) for k, v in source.items()}
    model = build(arch, seed=5)
    opt = wrap(model)
    model.load_state_dict(source, strict=True)
    model.train()
    torch.manual_seed(0)
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    for name, conv in ovsw.binary_convs(model):
        assert torch.equal(conv.weight_prev, source[name + ".weight"]), name
        assert not torch.equal(conv.weight.detach(), source[name + ".weight"]), name


# -- 4. create() and the binary-conv options -----------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_binary_and_full_precision_convs(arch):
    model = build(arch)
    binary = [n for n, _ in ovsw.binary_convs(model)]
    assert len(binary) == BINARY_COUNT[arch]
    # Exactly the layers that carry a tracker in the upstream fixture, in order.
    assert binary == [k[: -len(".tracker")] for k in UPSTREAM[arch] if k.endswith(".tracker")]
    fp = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, OvSWConv2d)
    ]
    assert fp == FP_CONVS[arch]
    for n, m in model.named_modules():
        if isinstance(m, OvSWConv2d):
            assert m.bias is None, n
            assert m.act_a == "binary" and m.act_w == "ste" and m.forward_type == "xnor", n
            assert m.scaling_factor is None, n
        if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)):
            assert type(m).__module__.startswith("torch.nn"), n
        if isinstance(m, nn.Hardtanh):
            assert list(m.parameters()) == [], n


@pytest.mark.parametrize("arch", ARCHS)
def test_create_passes_conv_options(arch):
    model = build(arch, act_a="binary", act_w="hardtanh", scaling_factor=True)
    convs = ovsw.binary_convs(model)
    assert len(convs) == BINARY_COUNT[arch]
    for name, m in convs:
        assert m.act_a == "binary", name
        assert m.act_w == "hardtanh", name
        assert isinstance(m.scaling_factor, nn.Parameter), name
        assert m.scaling_factor.requires_grad, name
        assert m.scaling_factor.shape == (m.out_channels,), name
        # mean_o |W| of the weight as initialised (the scaling factor comes after init).
        expected = m.weight.detach().abs().mean(dim=(1, 2, 3))
        torch.testing.assert_close(m.scaling_factor.detach(), expected, rtol=1e-6, atol=0)
    # The scale is a parameter of the model and appears right after its conv's weight.
    names = {n for n, _ in model.named_parameters()}
    keys = list(model.state_dict())
    for name, _ in convs:
        assert name + ".scaling_factor" in names
        assert keys[keys.index(name + ".weight") + 1] == name + ".scaling_factor"
    # Full-precision layers keep no binary-conv options.
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, OvSWConv2d):
            assert not hasattr(m, "scaling_factor") or m.scaling_factor is None, n


@pytest.mark.parametrize("act_w", ["ste", "hardtanh", "ste_v2", "hardtanhv2"])
def test_factories_pass_act_w(act_w):
    for factory in (ovsw.models.cResNet20_1w1a, ovsw.models.VGGSmall_1w1a):
        model = factory(act_w=act_w)
        assert {m.act_w for _, m in ovsw.binary_convs(model)} == {act_w}
        assert all(m.scaling_factor is None for _, m in ovsw.binary_convs(model))


def test_scaling_factor_trains():
    model = build("cResNet20_1w1a", scaling_factor=True).train()
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    for name, m in ovsw.binary_convs(model):
        assert m.scaling_factor.grad is not None, name
        assert m.scaling_factor.grad.abs().sum() > 0, name


def test_create_forward_type_keyword():
    model = build("cResNet20_1w1a", forward_type="xnor")
    assert {m.forward_type for _, m in ovsw.binary_convs(model)} == {"xnor"}


def test_create_num_classes():
    model = build("cResNet20_1w1a", num_classes=100)
    assert model.linear.weight.shape == (100, 64)
    model = build("cResNet18_1w1a", num_classes=100)
    assert model.fc.weight.shape == (100, 512, 1, 1)
    model = build("VGGSmall_1w1a", num_classes=100)
    assert model.fc.weight.shape == (100, 8192)
    model = build("ResNet18_1w1a", num_classes=10)
    assert model.fc.weight.shape == (10, 512)


def test_factories_match_create():
    for arch in ["cResNet20_1w1a", "VGGSmall_1w1a"]:
        factory = getattr(ovsw.models, arch)
        torch.manual_seed(3)
        a = factory()
        b = build(arch, seed=3)
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_arch():
    with pytest.raises(ValueError, match="ResNet19_1w1a") as info:
        ovsw.models.create("ResNet19_1w1a")
    for arch in ARCHS:
        assert arch in str(info.value)


@pytest.mark.parametrize("num_classes", [0, -3])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        ovsw.models.create("cResNet20_1w1a", num_classes=num_classes)
    with pytest.raises(ValueError, match="num_classes"):
        ovsw.models.cResNet20_1w1a(num_classes)


def test_bad_act_w():
    with pytest.raises(ValueError, match="act_w"):
        ovsw.models.create("cResNet20_1w1a", act_w="sign")


# -- 5. init ---------------------------------------------------------------------------


def assert_std(t: torch.Tensor, expected: float, rel: float, what: str) -> None:
    """std(t) within relative ``rel`` of ``expected`` and mean(t) within 4 standard
    errors of 0 (a NaN or inf anywhere in ``t`` fails both)."""
    std = t.detach().double().std().item()
    assert within(rel_err(std, expected), rel), f"{what}: std {std:.4g} vs {expected:.4g}"
    mean = t.detach().double().mean().item()
    bound = 4 * expected / math.sqrt(t.numel())
    assert within(max_abs_err(mean, 0.0), bound), f"{what}: mean {mean:.3g}"


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_assert_std_refuses_a_nonfinite_weight(bad):
    t = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    assert_std(t, 1.0, 0.1, "clean")
    t[7] = bad
    with pytest.raises(AssertionError):
        assert_std(t, 1.0, 0.1, "poisoned")


def test_vgg_init():
    model = build("VGGSmall_1w1a")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    for name, m in convs:
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        assert_std(m.weight, math.sqrt(2.0 / n), 0.1, name)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)), name
            assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    assert_std(model.fc.weight, 0.01, 0.03, "fc")
    assert torch.equal(model.fc.bias, torch.zeros_like(model.fc.bias))
    assert isinstance(model.nonlinear5, nn.PReLU)
    assert model.nonlinear5.weight.shape == (512,)
    for i in range(5):
        assert isinstance(getattr(model, f"nonlinear{i}"), nn.Hardtanh)


@pytest.mark.parametrize("arch", IMAGENET)
def test_imagenet_resnet_init(arch):
    model = build(arch)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == BINARY_COUNT[arch] + 1 + 3  # 2 per block, stem, downsamples
    for name, m in bns:
        assert torch.equal(m.weight, torch.full_like(m.weight, 1e-8)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name
    # The head's BatchNorm1d keeps PyTorch's default.
    assert isinstance(model.bn2, nn.BatchNorm1d)
    assert torch.equal(model.bn2.weight, torch.ones(512))
    assert torch.equal(model.bn2.bias, torch.zeros(512))


@pytest.mark.parametrize("arch", ["cResNet20_1w1a", "cResNet18_1w1a", "ResNet18_1w1a"])
def test_binary_conv_kaiming_init(arch):
    model = build(arch)
    for name, m in ovsw.binary_convs(model):
        if m.weight.numel() < 4000:
            continue  # too few samples for a tight std check
        fan_in = m.weight[0].numel()
        # kaiming_normal_(mode="fan_in", nonlinearity="leaky_relu"), a = 0: sqrt(2 / fan_in)
        assert_std(m.weight, math.sqrt(2.0 / fan_in), 0.1, name)


@pytest.mark.parametrize("arch", ["cResNet20_1w1a", "cResNet18_1w1a", "ResNet18_1w1a"])
def test_full_precision_layers_keep_default_init(arch):
    # PyTorch's default conv/linear init is kaiming_uniform(a=sqrt(5)): |w| <= 1/sqrt(fan_in).
    model = build(arch)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, OvSWConv2d):
            bound = 1.0 / math.sqrt(m.weight[0].numel())
            largest = max_abs_err(m.weight, torch.zeros_like(m.weight))
            assert within(largest, bound), name
            # and spread over the range, as a uniform draw is
            assert largest >= 0.5 * bound, name
