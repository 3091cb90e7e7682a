"""Replays one training step recorded from upstream OvSW (tests/data/upstream_cresnet20_step.pt)
and matches every recorded tensor within relative 1e-5 of its largest magnitude."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ovsw

DATA = Path(__file__).parent / "data" / "upstream_cresnet20_step.pt"
REL = 1e-5


def assert_close(actual, expected, what):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= REL * max(scale, 1e-30), f"{what}: max abs err {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module")
def record():
    return torch.load(DATA, weights_only=False)


@pytest.fixture(scope="module")
def replay(record):
    torch.manual_seed(0)
    cfg = record["config"]
    model = ovsw.models.create(
        record["arch"],
        num_classes=record["num_classes"],
        act_a=cfg["act_a"],
        act_w=cfg["act_w"],
        scaling_factor=cfg["scaling_factor"],
    )
    model.load_state_dict(record["state_before"], strict=True)
    sgd = torch.optim.SGD(model.parameters(), **record["sgd"])
    for name, p in model.named_parameters():
        sgd.state[p]["momentum_buffer"] = record["momentum_before"][name].clone()
    opt = ovsw.OvSW(
        sgd,
        model,
        enable_ags=cfg["enable_ags"],
        delta=cfg["delta"],
        enable_dampen=cfg["enable_dampen"],
        dampen_weight=cfg["dampen_weight"],
        track_momentum=cfg["track_momentum"],
        track_threshold=cfg["track_threshold"],
        track_ones=cfg["track_ones"],
    )
    # The loaded SAD state must survive the optimizer's set-up.
    for name, m in ovsw.binary_convs(model):
        assert torch.equal(m.tracker, record["state_before"][name + ".tracker"])

    model.train()
    x = record["x"].clone().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, record["y"])
    opt.zero_grad()
    loss.backward()
    out = {
        "logits_train": logits.detach(),
        "loss": loss.detach(),
        "input_grad": x.grad.detach().clone(),
        "grads_raw": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
    }
    opt.step()
    out["grads_final"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    out["stats"] = opt.stats()
    out["state_after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out["logits_eval_after"] = model(record["x"])
    return out


@pytest.mark.parametrize("key", ["logits_train", "loss", "input_grad", "logits_eval_after"])
def test_tensor(record, replay, key):
    assert_close(replay[key], record[key], key)


@pytest.mark.parametrize("key", ["grads_raw", "grads_final", "state_after"])
def test_tensor_dicts(record, replay, key):
    expected = record[key]
    assert list(replay[key]) == list(expected), f"{key}: keys differ"
    for name, value in expected.items():
        assert_close(replay[key][name], value, f"{key}[{name}]")


def test_step_changes_something(record, replay):
    # Guards against a replay that trivially "matches" by not stepping at all.
    moved = [
        k
        for k, v in record["state_before"].items()
        if v.is_floating_point() and not torch.equal(v, record["state_after"][k])
    ]
    assert moved, "the recorded step should change the state"
    for k in moved:
        assert not torch.equal(replay["state_after"][k], record["state_before"][k]), k


def test_layer_figures(record, replay):
    stats = replay["stats"]
    assert [s["name"] for s in stats] == record["binary_layers"]
    assert_close([s["ags_ratio"] for s in stats], record["ags_ratio"], "ags_ratio")
    assert_close([s["silent_ratio"] for s in stats], record["silent_ratio"], "silent_ratio")
