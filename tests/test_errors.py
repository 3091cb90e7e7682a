"""Bad input raises a clear Python exception naming what was wrong."""

import pytest
import torch
from torch import nn

import ovsw


def conv(**kw):
    return ovsw.OvSWConv2d(4, 6, 3, padding=1, **kw)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("shape", [(4, 5, 5), (1, 1, 4, 5, 5), (20,)])
def test_non_4d_input(shape):
    with pytest.raises(ValueError, match="4-D input"):
        conv()(torch.randn(*shape))


def test_channel_mismatch():
    with pytest.raises(ValueError, match="3 channels but the layer expects in_channels=4"):
        conv()(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        conv()(torch.ones(1, 4, 5, 5, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        conv()([[1.0]])


def test_tensors_on_different_devices():
    layer = conv().to("meta")
    with pytest.raises(ValueError, match="weight is on .* but the input is on"):
        layer(torch.randn(1, 4, 5, 5))


def test_unknown_act_w():
    with pytest.raises(ValueError, match=r"unknown act_w .sgn."):
        conv(act_w="sgn")


def test_unknown_act_a_and_forward_type():
    with pytest.raises(ValueError, match="act_a"):
        conv(act_a="relu")
    with pytest.raises(ValueError, match="forward_type"):
        conv(forward_type="float")


def test_padding_mode():
    with pytest.raises(ValueError, match="padding_mode"):
        conv(padding_mode="reflect")


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: ovsw.OvSWConv2d(1, 4, 1, **kw),
        lambda **kw: ovsw.OvSWConv2d(4, 4, 1, groups=4, **kw),
        lambda **kw: ovsw.OvSWLinear(1, 3, **kw),
    ],
    ids=["conv1x1_one_channel", "depthwise1x1", "linear_one_feature"],
)
def test_one_weight_per_channel_needs_a_learned_scale(make):
    # The derived scale divides by the unbiased deviation of one value: NaN.
    with pytest.raises(ValueError, match=r"1 weight\(s\) per output channel.*scaling_factor=True"):
        make()
    layer = make(scaling_factor=True)
    if isinstance(layer, ovsw.OvSWConv2d):
        x = torch.randn(2, layer.in_channels, 3, 3, requires_grad=True)
    else:
        # [N, 1] would leave each sample one value, whose deviation (SPEC 1.1) is NaN.
        x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert (y != 0).any()
    for t in (y, layer.weight.grad, x.grad):
        assert torch.isfinite(t).all()
    # On the meta device the weight is not there yet: not refused.
    make(device="meta")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(delta=-0.1), "delta"),
        (dict(dampen_weight=-1e-5), "dampen_weight"),
        (dict(track_threshold=-1e-4), "track_threshold"),
        (dict(track_momentum=1.0), "track_momentum"),
        (dict(track_momentum=-0.1), "track_momentum"),
        (dict(delta=float("nan")), "delta"),
    ],
)
def test_bad_hyperparameters(kw, match):
    model = nn.Sequential(conv())
    with pytest.raises(ValueError, match=match):
        ovsw.OvSW(sgd(model), model, **kw)


def test_model_without_binary_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no binary layer"):
        ovsw.OvSW(sgd(model), model)


def test_wrapping_a_non_optimizer():
    model = nn.Sequential(conv())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ovsw.OvSW(object(), model)


def test_unknown_arch():
    with pytest.raises(ValueError, match="ResNet19_1w1a"):
        ovsw.models.create("ResNet19_1w1a")


def test_sad_buffers_of_wrong_shape():
    layer = conv()
    model = nn.Sequential(layer)
    opt = ovsw.OvSW(sgd(model), model, enable_dampen=True, dampen_weight=1e-3)
    layer.tracker = torch.zeros(3)
    layer(torch.randn(1, 4, 5, 5)).sum().backward()
    with pytest.raises(ValueError, match="tracker has shape"):
        opt.step()
