"""``ovsw.binarize`` and ``ovsw.summary`` (issue 13): torchvision's resnet18,
mobilenet_v2 (depthwise groups), vgg11_bn and efficientnet_b0 at random init (nothing
is downloaded) are converted, train one OvSW step, export to torch.export and to the
deploy engine (or fail naming the first op the engine lacks); layer selection, options
and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ovsw
import ovsw.deploy as deploy
from conftest import engine_threads
from ovsw import OvSWConv2d, OvSWLinear
from ovsw.testing import rel_err_per_sample, within

# (name, linear, training resolution): large enough that the last stage keeps more than
# one value per channel in the batch (BatchNorm of two values passes no gradient).
MODELS = [
    ("resnet18", False, 64),
    ("mobilenet_v2", False, 64),
    ("vgg11_bn", True, 32),
    ("efficientnet_b0", False, 64),
]


def _torchvision(name):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _layers(model, cls):
    return [(n, m) for n, m in model.named_modules() if type(m) is cls]


@pytest.mark.parametrize("name, linear, res", MODELS)
@pytest.mark.slow
def test_torchvision_models_convert_and_train_one_step(name, linear, res):
    original = _torchvision(name)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    convs = _layers(original, nn.Conv2d)
    linears = _layers(original, nn.Linear)
    model = ovsw.binarize(original, linear=linear)

    # the original is untouched (a copy was converted)
    assert not ovsw.binary_layers(original)
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), k
    # every nn.Conv2d but the first is binary, with the same weights and geometry
    first = convs[0][0]
    for n, conv in convs:
        new = model.get_submodule(n)
        if n == first:
            assert type(new) is nn.Conv2d
            continue
        assert type(new) is OvSWConv2d, n
        assert torch.equal(new.weight, conv.weight), n
        assert (new.stride, new.padding, new.groups) == (conv.stride, conv.padding, conv.groups)
        assert (new.bias is None) == (conv.bias is None)
    # linear layers: binary with linear=True, except the last (the classifier)
    for i, (n, lin) in enumerate(linears):
        new = model.get_submodule(n)
        expect = OvSWLinear if linear and i < len(linears) - 1 else nn.Linear
        assert type(new) is expect, n
        assert torch.equal(new.weight, lin.weight), n
    if name == "mobilenet_v2":  # depthwise convs kept their groups
        assert any(m.groups == m.in_channels > 1 for _, m in ovsw.binary_convs(model))
    if linear:
        assert any(isinstance(m, OvSWLinear) for _, m in ovsw.binary_layers(model))

    # one OvSW training step
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ovsw.OvSW(sgd, model, enable_ags=True, delta=0.01, enable_dampen=True)
    x = torch.randn(4, 3, res, res, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 7, 0, 3])
    start = {n: m.weight.detach().clone() for n, m in ovsw.binary_layers(model)}
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    stats = opt.stats()
    assert [s["name"] for s in stats] == list(start)
    assert all(s["ags_ratio"] is not None and s["silent_ratio"] is not None for s in stats)
    moved = [n for n, m in ovsw.binary_layers(model) if not torch.equal(m.weight, start[n])]
    assert len(moved) == len(start)
    for n, m in ovsw.binary_layers(model):
        assert m.tracker is not None and torch.isfinite(m.weight).all(), n


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
@pytest.mark.slow
def test_converted_models_torch_export(name):
    model = ovsw.binarize(_torchvision(name)).eval()
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.ovsw.binary_conv2d.default) == len(ovsw.binary_convs(model))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


# (name, linear, deploy input size)
DEPLOYABLE = [("resnet18", False, 64), ("mobilenet_v2", False, 64), ("vgg11_bn", True, 224)]


@pytest.mark.parametrize("name, linear, size", DEPLOYABLE)
@pytest.mark.slow
def test_converted_models_deploy(name, linear, size, tmp_path):
    """Lowered through torch.fx: BatchNorm, residual additions and ReLU/ReLU6 fold into
    the binary ops, OvSWLinear runs as XNOR-popcount rows; logits equal PyTorch's."""
    model = ovsw.binarize(_torchvision(name), linear=linear).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = deploy.export(model, tmp_path / "m.ovsw", input_size=size)
    engine = deploy.load(path, threads=engine_threads())
    ops = dict(engine._engine.ops)
    for n, _ in ovsw.binary_layers(model):
        assert ops[n] == "bconv2d", n
    assert not any(op == "affine" for op in ops.values()) or name == "vgg11_bn"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).numpy()
    y = engine(x.numpy())
    rel = rel_err_per_sample(y, ref)
    assert within(rel.max(), 1e-4), rel


def test_deploy_names_the_first_unsupported_op(tmp_path):
    model = ovsw.binarize(_torchvision("efficientnet_b0")).eval()
    with pytest.raises(TypeError, match=r"no deploy lowering for SiLU \(module 'features\.0\.2'\)"):
        deploy.export(model, tmp_path / "m.ovsw", input_size=64)
    assert not (tmp_path / "m.ovsw").exists()


def test_deploy_refuses_a_residual_without_a_binary_layer(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = self.a(x)
            return self.b(x) + x

    with pytest.raises(TypeError, match="adds a residual only to the output of a binary"):
        deploy.export(Net().eval(), tmp_path / "m.ovsw", input_size=8)


# -- options and selection --------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.other = nn.Conv2d(8, 8, 1)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.other(self.block(self.stem(x))).mean(dim=(2, 3))
        return self.head(self.hidden(x))


def _kinds(model):
    return {
        n: type(m).__name__
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_defaults_keep_the_first_conv_and_the_classifier():
    model = ovsw.binarize(Small(), linear=True)
    assert _kinds(model) == {
        "stem": "Conv2d",
        "block.0": "OvSWConv2d",
        "other": "OvSWConv2d",
        "hidden": "OvSWLinear",
        "head": "Linear",
    }
    model = ovsw.binarize(Small(), keep_first=False, keep_last=False, linear=True)
    assert set(_kinds(model).values()) == {"OvSWConv2d", "OvSWLinear"}


def test_options_reach_every_layer():
    src = Small()
    model = ovsw.binarize(src, linear=True, act_w="hardtanhv2", scaling_factor=True)
    for _, m in ovsw.binary_layers(model):
        assert m.act_w == "hardtanhv2"
        expected = m.weight.detach().abs().reshape(m.weight.shape[0], -1).mean(1)
        torch.testing.assert_close(m.scaling_factor.detach(), expected)
    assert model.get_submodule("block.0").bias is not None
    assert torch.equal(model.get_submodule("block.0").bias, src.block[0].bias)


def test_selection_by_name_container_predicate_and_exclude():
    assert _kinds(ovsw.binarize(Small(), layers=["other"]))["block.0"] == "Conv2d"
    assert _kinds(ovsw.binarize(Small(), layers="block"))["block.0"] == "OvSWConv2d"
    assert _kinds(ovsw.binarize(Small(), layers="block"))["other"] == "Conv2d"
    picked = ovsw.binarize(Small(), layers=lambda n, m: m.kernel_size == (1, 1))
    assert [n for n, _ in ovsw.binary_layers(picked)] == ["other"]
    kept = ovsw.binarize(Small(), exclude=["block.0"])
    assert [n for n, _ in ovsw.binary_layers(kept)] == ["other"]


def test_inplace_keeps_the_parameter_objects():
    model = Small()
    weight = model.other.weight
    out = ovsw.binarize(model, inplace=True)
    assert out is model and isinstance(model.other, OvSWConv2d)
    assert model.other.weight is weight


def test_a_module_used_twice_is_converted_once():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), conv, nn.ReLU(), conv, nn.Linear(8, 2))
    out = ovsw.binarize(model)
    assert isinstance(out[1], OvSWConv2d) and out[1] is out[3]


def test_converted_layers_give_the_ovsw_layer_forward():
    torch.manual_seed(0)
    model = ovsw.binarize(Small(), keep_first=False)
    x = torch.randn(2, 3, 6, 6)
    layer = model.stem
    ref = OvSWConv2d(3, 8, 3, padding=1, bias=True)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(act_ww="ste"), "unknown option 'act_ww'"),
        (dict(act_w="sgn"), "unknown act_w 'sgn'"),
        (dict(scaling_factor="yes"), "scaling_factor must be True or False"),
        (dict(layers=["block.7"]), "'block.7', which is not a module of the model"),
        (dict(exclude="nope"), "exclude names 'nope', which is not a module"),
        (
            dict(layers=["hidden"]),
            "'hidden', a Linear with no layer binarize converts.*linear=True",
        ),
        (dict(layers=["stem"]), "'stem', which keep_first=True keeps full precision"),
        (dict(layers=["head"], linear=True), "'head', which keep_last=True keeps"),
        (dict(layers=lambda n, m: False), "has no nn.Conv2d layer to convert"),
    ],
)
def test_bad_input_raises_value_error_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ovsw.binarize(Small(), **kwargs)


def test_nothing_to_convert():
    with pytest.raises(ValueError, match=r"\(Sequential\) has no nn.Conv2d layer"):
        ovsw.binarize(nn.Sequential(nn.ReLU(), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="besides the ones kept full precision"):
        ovsw.binarize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3)))


def test_unconvertible_layer_is_named():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding_mode="reflect", padding=1), nn.Linear(3, 3)
    )
    with pytest.raises(ValueError, match="'1' has padding_mode='reflect'"):
        ovsw.binarize(model)


def test_a_layer_of_one_weight_per_channel_is_named():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.Conv2d(4, 4, 1, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with pytest.raises(ValueError, match=r"binarize: '1': 1 weight\(s\) per output channel"):
        ovsw.binarize(model)
    converted = ovsw.binarize(model, scaling_factor=True)
    assert isinstance(converted[1], ovsw.OvSWConv2d)
    assert torch.isfinite(converted(torch.randn(2, 3, 5, 5))).all()


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ovsw.binarize("resnet18")


# -- summary ---------------------------------------------------------------------------------
def test_summary_counts_bits():
    model = ovsw.binarize(_torchvision("resnet18"))
    lines = []
    s = ovsw.summary(model, print_fn=lines.append)
    params = sum(p.numel() for p in model.parameters())
    binary = sum(m.weight.numel() for _, m in ovsw.binary_convs(model))
    assert s.params == params and s.binary_params == binary
    assert s.bits == binary + 32 * (params - binary)
    assert s.float_bits == 32 * params
    text = lines[0]
    assert text == str(s)
    row = next(line for line in text.splitlines() if line.startswith("layer1.0.conv1 "))
    assert row.split()[1:5] == ["OvSWConv2d", "binary", "36,864", "36,864"]
    assert row.split()[-2:] == ["4.50", "144.00"]
    conv1 = next(line for line in text.splitlines() if line.startswith("conv1 "))
    assert conv1.split()[1:3] == ["Conv2d", "float"]
    total = next(line for line in text.splitlines() if line.startswith("Total"))
    assert f"{params:,}" in total and f"{binary:,}" in total
    assert f"({s.float_bits / s.bits:.2f}x smaller)" in text


def test_summary_counts_shared_parameters_once():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert ovsw.summary(model, print_fn=None).params == 20


def test_deploy_runs_binary_linear_layers_exactly(tmp_path):
    """OvSWLinear layers (an fx-lowered model: flatten, binary linear with BatchNorm1d and
    a residual, ReLU zeros in its input, a float head) run as XNOR-popcount rows."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.fc1 = OvSWLinear(4 * 6 * 6, 70, scaling_factor=True, act_w="ste_v2")
            self.bn1 = nn.BatchNorm1d(70)
            self.fc2 = OvSWLinear(70, 70, bias=True)
            self.bn2 = nn.BatchNorm1d(70)
            self.head = nn.Linear(70, 3)

        def forward(self, x):
            x = torch.flatten(torch.relu(self.stem(x)), 1)
            x = torch.relu(self.bn1(self.fc1(x)))
            x = torch.relu(self.bn2(self.fc2(x)) + x)
            return self.head(x)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.fc2.weight[0, :5] = 0.0  # exact zeros: the masked kernel
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    engine = deploy.load(
        deploy.export(model, tmp_path / "m.ovsw", input_size=6), threads=engine_threads()
    )
    assert engine._engine.ops == [
        ("stem", "conv2d"),
        ("flatten", "flatten"),
        ("fc1", "bconv2d"),
        ("fc2", "bconv2d"),
        ("head", "linear"),
    ]
    x = torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).numpy()
    y = engine(x.numpy())
    rel = rel_err_per_sample(y, ref)
    assert within(rel.max(), 1e-4), rel
