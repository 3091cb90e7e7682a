"""OvSWConv2d as a module: options, padding forms, pickling, SAD buffers in state_dict."""

import copy
import io
import pickle

import pytest
import torch

import ovsw


def test_is_a_conv2d_with_bias_off_by_default():
    layer = ovsw.OvSWConv2d(3, 4, 3)
    assert isinstance(layer, torch.nn.Conv2d) and layer.bias is None
    assert (layer.act_a, layer.act_w, layer.forward_type) == ("binary", "ste", "xnor")
    assert "act_w='ste'" in repr(layer)


@pytest.mark.parametrize("padding, expected", [("same", (1, 1)), ("valid", (0, 0)), (2, (2, 2))])
def test_padding_forms(padding, expected):
    torch.manual_seed(0)
    layer = ovsw.OvSWConv2d(3, 4, 3, padding=padding)
    explicit = ovsw.OvSWConv2d(3, 4, 3, padding=expected)
    explicit.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), explicit(x), rtol=0, atol=0)


def test_same_padding_with_an_even_window_is_refused():
    with pytest.raises(ValueError, match="padding='same'"):
        ovsw.OvSWConv2d(3, 4, 2, padding="same")


def test_pickle_deepcopy_and_torch_save():
    torch.manual_seed(0)
    model = ovsw.models.create("cResNet20_1w1a", act_w="hardtanhv2")
    ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, enable_dampen=True)
    spec = model.layer1[0].conv1.spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    clone = copy.deepcopy(model).eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(clone(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    assert loaded.layer1[0].conv1.act_w == "hardtanhv2"
    assert torch.equal(loaded.layer1[0].conv1.tracker, model.layer1[0].conv1.tracker)


def test_sad_buffers_are_optional_in_state_dict():
    layer = ovsw.OvSWConv2d(3, 4, 3)
    assert set(layer.state_dict()) == {"weight"}
    layer.setup_sad()
    assert list(layer.state_dict()) == ["weight", "weight_prev", "tracker"]
    fresh = ovsw.OvSWConv2d(3, 4, 3)
    fresh.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(fresh.weight_prev, layer.weight_prev)


def test_scaling_factor_parameter():
    torch.manual_seed(0)
    layer = ovsw.OvSWConv2d(3, 4, 3, scaling_factor=True)
    expected = layer.weight.detach().abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(layer.scaling_factor.detach(), expected)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.scaling_factor.grad is not None and layer.scaling_factor.grad.abs().sum() > 0


# -- OvSWLinear ----------------------------------------------------------------------------------
def test_linear_sad_buffers_and_state_dict():
    """The conv's state_dict semantics: SAD buffers optional on both sides."""
    layer = ovsw.OvSWLinear(6, 4, bias=True)
    assert set(layer.state_dict()) == {"weight", "bias"}
    layer.setup_sad()
    assert list(layer.state_dict()) == ["weight", "bias", "weight_prev", "tracker"]
    assert layer.tracker.shape == layer.weight.shape and not layer.tracker.any()
    fresh = ovsw.OvSWLinear(6, 4, bias=True)
    fresh.load_state_dict(layer.state_dict())  # buffers taken though SAD is not set up
    assert torch.equal(fresh.weight_prev, layer.weight_prev)
    with torch.no_grad():
        layer.tracker.fill_(0.5)
    plain = {k: v for k, v in ovsw.OvSWLinear(6, 4, bias=True).state_dict().items()}
    layer.load_state_dict(plain)  # a checkpoint without them: SAD restarts
    assert not layer.tracker.any() and torch.equal(layer.weight_prev, plain["weight"])


def test_linear_options_repr_and_pickle():
    layer = ovsw.OvSWLinear(5, 3, act_w="ste_v2", scaling_factor=True)
    assert (layer.act_a, layer.act_w, layer.forward_type) == ("binary", "ste_v2", "xnor")
    assert "act_w='ste_v2'" in repr(layer) and "scaling_factor=True" in repr(layer)
    assert layer.bias is None  # as OvSWConv2d, bias defaults to False
    clone = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 5)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown act_w 'sgn'"):
        ovsw.OvSWLinear(5, 3, act_w="sgn")
    with pytest.raises(TypeError, match="scaling_factor must be a bool"):
        ovsw.OvSWLinear(5, 3, scaling_factor="yes")


def test_linear_input_errors():
    layer = ovsw.OvSWLinear(5, 3)
    with pytest.raises(ValueError, match="batch dim"):
        layer(torch.randn(5))
    with pytest.raises(ValueError, match="has 4 features .* in_features=5"):
        layer(torch.randn(2, 4))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        layer([1.0] * 5)


def test_ovsw_acts_on_linear_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ovsw.OvSWConv2d(3, 4, 3), torch.nn.Flatten(), ovsw.OvSWLinear(4 * 4 * 4, 2)
    )
    opt = ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, enable_dampen=True)
    assert [n for n, _ in opt.layers] == ["0", "2"]
    assert model[2].tracker is not None
    model(torch.randn(3, 3, 6, 6)).sum().backward()
    opt.step()
    assert [s["name"] for s in opt.stats()] == ["0", "2"]
    assert ovsw.binary_convs(model) == [("0", model[0])]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("act_w", ["ste", "ste_v2"])
@pytest.mark.parametrize("linear", [False, True])
def test_a_nan_input_binarizes_to_zero_as_torch_sign(training, act_w, linear):
    # torch.sign(nan) is 0, in upstream's formula and here: a NaN activation contributes
    # nothing (in training it makes its whole sample's std NaN, so that sample's
    # activations all binarize to 0), and the other outputs stay finite.
    from ovsw.testing import assert_close, to_oracle

    torch.manual_seed(0)
    if linear:
        layer = ovsw.OvSWLinear(12, 6, act_w=act_w)
        x = torch.randn(3, 12)
        x[0, 5] = float("nan")
    else:
        layer = ovsw.OvSWConv2d(4, 6, 3, padding=1, act_w=act_w)
        x = torch.randn(3, 4, 5, 5)
        x[0, 1, 2, 3] = float("nan")
    layer.train(training)
    reference = to_oracle(layer)
    want = reference(x).detach()
    assert torch.isfinite(want).all(), "upstream's formula gives finite outputs here"
    assert_close(layer(x).detach(), want, atol=1e-5, rtol=1e-5, what="output")
