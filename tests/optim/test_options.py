"""Each OvSW option and binarizer name is defined once, in the Rust core (issue 10):
``_core.ovsw_options()`` is the table, ``OvSWConfig`` validates from it, and
``ovsw.OvSW`` derives its keywords, signature and docstring from it."""

from __future__ import annotations

import inspect
import math
import pickle
import pydoc

import pytest
import torch
from torch import nn

import ovsw
from ovsw import _core

# SPEC section 3: "Flags and defaults" (the behaviour the project reproduces).
SPEC_DEFAULTS = {
    "enable_ags": False,
    "delta": 0.01,
    "enable_dampen": False,
    "dampen_weight": 0.0,
    "track_momentum": 0.999,
    "track_threshold": 1e-4,
    "track_ones": False,
}
KEYS = {"name", "type", "default", "min", "min_inclusive", "max", "max_inclusive", "range", "help"}


def table():
    return _core.ovsw_options()


def test_table_shape_and_order():
    opts = table()
    assert [o["name"] for o in opts] == list(SPEC_DEFAULTS)
    for o in opts:
        assert set(o) == KEYS, o["name"]
        assert o["type"] in ("bool", "float")
        assert isinstance(o["default"], bool if o["type"] == "bool" else float)
        assert isinstance(o["help"], str) and o["help"] and "\n" not in o["help"]
        for end in ("min", "max"):
            assert o[end] is None or isinstance(o[end], float)
            assert isinstance(o[f"{end}_inclusive"], bool)
        if o["type"] == "bool":
            assert o["min"] is None and o["max"] is None


def test_defaults_are_the_spec_values_and_ovswconfigs():
    cfg = _core.OvSWConfig()
    for o in table():
        assert o["default"] == SPEC_DEFAULTS[o["name"]], o["name"]
        assert getattr(cfg, o["name"]) == o["default"], o["name"]


def test_ranges_as_the_spec_requires():
    ranges = {
        o["name"]: (o["min"], o["min_inclusive"], o["max"], o["max_inclusive"]) for o in table()
    }
    assert ranges["track_momentum"] == (0.0, True, 1.0, False)
    for name in ("delta", "dampen_weight", "track_threshold"):
        assert ranges[name] == (0.0, True, None, False)


def test_range_text_is_the_cores_and_rendered_once():
    """The table carries the range in words (None for a flag); OvSW's docstring and the
    core's error messages show that very text."""
    text = {o["name"]: o["range"] for o in table()}
    assert text["track_momentum"] == "in [0, 1)"
    assert text["delta"] == "a finite number >= 0"
    assert text["enable_ags"] is None and text["track_ones"] is None
    doc = ovsw.OvSW.__doc__
    assert "track_momentum (float, default 0.999, in [0, 1))" in doc
    assert "delta (float, default 0.01, a finite number >= 0)" in doc
    assert "enable_ags (bool, default False)" in doc


def test_check_option_is_the_configs_check():
    _core.ovsw_check_option("delta", 0.0)
    _core.ovsw_check_option("enable_ags", True)
    with pytest.raises(ValueError, match=r"^track_momentum must be in \[0, 1\), got 1$"):
        _core.ovsw_check_option("track_momentum", 1.0)
    with pytest.raises(ValueError, match=r"^delta must be a finite number >= 0, got inf$"):
        _core.ovsw_check_option("delta", math.inf)
    with pytest.raises(TypeError, match="unknown OvSW option 'deltaa'"):
        _core.ovsw_check_option("deltaa", 0.1)
    with pytest.raises(TypeError, match="enable_ags must be a bool"):
        _core.ovsw_check_option("enable_ags", 0.5)


def _float_options():
    return [o for o in table() if o["type"] == "float"]


@pytest.mark.parametrize("opt", _float_options(), ids=lambda o: o["name"])
def test_each_range_end_is_accepted_or_refused_as_the_table_says(opt):
    name = opt["name"]
    for end, step in (("min", -1.0), ("max", 1.0)):
        bound = opt[end]
        if bound is None:
            continue
        if opt[f"{end}_inclusive"]:
            assert getattr(_core.OvSWConfig(**{name: bound}), name) == bound
        else:
            with pytest.raises(ValueError, match=name):
                _core.OvSWConfig(**{name: bound})
        outside = bound + step * max(abs(bound), 1.0) * 1e-9
        with pytest.raises(ValueError, match=name):
            _core.OvSWConfig(**{name: outside})
        inside = bound - step * 1e-3
        assert getattr(_core.OvSWConfig(**{name: inside}), name) == inside
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=name):
            _core.OvSWConfig(**{name: bad})


def test_track_momentum_one_refused_zero_accepted():
    with pytest.raises(ValueError, match=r"track_momentum must be in \[0, 1\), got 1"):
        _core.OvSWConfig(track_momentum=1.0)
    assert _core.OvSWConfig(track_momentum=0.0).track_momentum == 0.0


def test_config_fields_are_read_only():
    cfg = _core.OvSWConfig()
    with pytest.raises(AttributeError):
        cfg.delta = 0.5  # type: ignore[misc]


def test_config_positional_keyword_and_pickle():
    c = _core.OvSWConfig(True, 0.04, True, 9e-4, 0.99, 1e-3, True)
    assert (c.enable_ags, c.delta, c.track_ones) == (True, 0.04, True)
    back = pickle.loads(pickle.dumps(c))
    assert [getattr(back, n) for n in SPEC_DEFAULTS] == [getattr(c, n) for n in SPEC_DEFAULTS]
    with pytest.raises(TypeError, match="multiple values for 'delta'"):
        _core.OvSWConfig(True, 0.04, delta=0.1)
    with pytest.raises(TypeError, match="at most 7"):
        _core.OvSWConfig(*([False] * 8))


def test_config_equality_and_hash_by_value():
    a = _core.OvSWConfig(enable_ags=True, delta=0.04)
    b = _core.OvSWConfig(True, 0.04)
    assert a == b and hash(a) == hash(b)
    assert a != _core.OvSWConfig(enable_ags=True, delta=0.05)
    assert a != (True, 0.04) and a != "OvSWConfig"
    assert ovsw.ops.OvSWConfig(True, 0.04) == a


def test_config_unknown_names_and_wrong_types():
    with pytest.raises(TypeError, match="'deltaa'"):
        _core.OvSWConfig(deltaa=0.1)
    with pytest.raises(TypeError, match="enable_ags must be a bool"):
        _core.OvSWConfig(enable_ags=0.5)
    with pytest.raises(TypeError, match="delta must be a float"):
        _core.OvSWConfig(delta="0.1")


def _model():
    return nn.Sequential(ovsw.OvSWConv2d(3, 4, 3))


def test_ovsw_signature_matches_the_table():
    params = list(inspect.signature(ovsw.OvSW).parameters.values())
    assert [p.name for p in params[:2]] == ["optimizer", "model"]
    options = params[2:]
    assert [p.name for p in options] == [o["name"] for o in table()]
    for p, o in zip(options, table()):
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, p.name
        assert p.default == o["default"] and type(p.default) is type(o["default"]), p.name


def test_help_shows_every_option_with_its_default_and_help():
    text = pydoc.render_doc(ovsw.OvSW, renderer=pydoc.plaintext)
    for o in table():
        assert f"{o['name']}: {o['type']} = {o['default']!r}" in text, o["name"]
        assert o["help"] in text, o["name"]


def test_ovsw_passes_every_option_through():
    model = _model()
    values = dict(
        enable_ags=True,
        delta=0.04,
        enable_dampen=True,
        dampen_weight=9e-4,
        track_momentum=0.99,
        track_threshold=1e-3,
        track_ones=True,
    )
    opt = ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, **values)
    assert {n: getattr(opt.config, n) for n in values} == values
    assert torch.equal(model[0].tracker, torch.ones_like(model[0].weight))  # track_ones


def test_ovsw_unknown_keywords_name_them():
    model = _model()
    with pytest.raises(TypeError, match="'enable_agss'.*'lamda'"):
        ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, enable_agss=True, lamda=1)


def test_the_step_hands_the_built_config_to_the_core(monkeypatch):
    """Built once by OvSW (validated by the core), then passed as it is, each step."""
    model = _model()
    opt = ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, enable_ags=True, delta=0.04)
    assert isinstance(opt.config, _core.OvSWConfig)
    seen = []
    real = _core.ags_sad_step

    def spy(config, *args):
        seen.append(config)
        return real(config, *args)

    monkeypatch.setattr(_core, "ags_sad_step", spy)
    for _ in range(2):
        model(torch.randn(2, 3, 5, 5)).sum().backward()
        opt.step()
    assert len(seen) == 2 and all(c is opt.config for c in seen)


def test_ovsw_refuses_what_the_table_refuses():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="track_momentum"):
        ovsw.OvSW(sgd, model, track_momentum=1.0)
    ovsw.OvSW(sgd, model, track_momentum=0.0)


def test_binarizer_names():
    assert _core.act_w_names() == ["ste", "hardtanh", "ste_v2", "hardtanhv2"]
    assert _core.act_a_names() == ["binary"]
    assert _core.forward_type_names() == ["xnor"]
    for name in _core.act_w_names():
        assert _core.ConvSpec(act_w=name).act_w == name
    with pytest.raises(ValueError, match="expected one of 'ste', 'hardtanh'"):
        _core.ConvSpec(act_w="sign")
    doc = ovsw.OvSWConv2d.__doc__
    assert all(f"'{n}'" in doc for n in _core.act_w_names())
