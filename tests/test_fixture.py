"""Replays one training step recorded from upstream OvSW (tests/data/upstream_cresnet20_step.pt)
and checks every recorded tensor against upstream's float32 record and its float64 replay.

The file holds two answers for the same step: ``record`` (upstream in float32, as it ran)
and ``record["ref64"]`` (upstream's replay of the same step in float64, stored rounded to
float32). Float64 is the truth; both upstream's float32 record and ours carry float32
rounding error against it, and that error depends on the CPU (oneDNN picks AVX2 or
AVX-512 kernels) and on the thread count (it splits reductions). Measured: upstream's own
record is up to 1.6e-5 (relative to the tensor's largest magnitude) from float64 in the
state after the step and 2.7e-5 in the gradients, so a flat 1e-5 against the record fails
on some CPUs for no fault of the code.

The check, per tensor (:func:`check`): within 1e-5 of the float32 record, or no further
from float64 than twice upstream's own float32 error, with a floor: 1e-5 for forward
quantities (logits, loss), 5e-5 for gradients and the state after the step. Nothing in
the bound depends on our own answer, so a wrong answer fails: ``test_check_rejects_*``
perturb one element by 1e-3 relative and expect the check to refuse it.

The replay runs at 1, 2 and 8 intra-op threads.

Eval logits after the step are computed from the recorded ``state_after``, not from our
own: a binary network is discontinuous in its weights. Our state after the step is held
to the bound above by ``test_state_after``, but float32 noise at the 1e-5 level in the
stem's weights and BatchNorm statistics (amplified by BatchNorm's 1/sqrt(running_var))
can move a pre-binarization value across zero. Measured on an AVX-512 CPU at 1 and 8
threads: one stem output at layer1.0.conv1's input is 7.0e-6 with our state and -1.3e-4
with upstream's record, which flips one sign and changes one of the 16 samples' logits
by 1.3. Evaluating the recorded state tests the eval forward itself (4.7e-8 from the
record).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ovsw

DATA = Path(__file__).parent / "data" / "upstream_cresnet20_step.pt"
#: Agreement with upstream's float32 record that needs no further argument.
REL = 1e-5
#: Floors of the float64-based bound.
FORWARD_FLOOR = 1e-5
GRADIENT_FLOOR = 5e-5
THREADS = (1, 2, 8)

OVSW_KEYS = (
    "enable_ags",
    "delta",
    "enable_dampen",
    "dampen_weight",
    "track_momentum",
    "track_threshold",
    "track_ones",
)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def check(ours, record, ref64, floor: float) -> str | None:
    """None when ``ours`` is within ``REL`` of upstream's float32 ``record``, or when
    ``rel(ours, ref64) <= max(2 * rel(record, ref64), floor)``; else why not."""
    to_record = rel_err(ours, record)
    if to_record <= REL:
        return None
    to_truth = rel_err(ours, ref64)
    bound = max(2 * rel_err(record, ref64), floor)
    if to_truth <= bound:
        return None
    return (
        f"relative error {to_record:.3e} to the float32 record (> {REL:.0e}) and "
        f"{to_truth:.3e} to float64 (> bound {bound:.3e})"
    )


def assert_checked(ours, record, ref64, floor: float, what: str) -> None:
    why = check(ours, record, ref64, floor)
    assert why is None, f"{what}: {why}"


@pytest.fixture(scope="module")
def record():
    return torch.load(DATA, weights_only=False)


def build(record):
    """The recorded model and its OvSW-wrapped SGD, from copies of the recorded state
    (the step must not write into the record, which several replays share)."""
    keys = ("config", "arch", "num_classes", "sgd", "state_before", "momentum_before")
    record = copy.deepcopy({k: record[k] for k in keys})
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
        sgd.state[p]["momentum_buffer"] = record["momentum_before"][name]
    opt = ovsw.OvSW(sgd, model, **{k: cfg[k] for k in OVSW_KEYS})
    return model, opt


def _replay(record):
    model, opt = build(record)
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
    # Eval logits of the recorded state after the step (see the module docstring).
    model.load_state_dict(record["state_after"], strict=True)
    model.eval()
    with torch.no_grad():
        out["logits_eval_after"] = model(record["x"])
    return out


@pytest.fixture(scope="module", params=THREADS, ids=lambda t: f"{t}threads")
def replay(record, request):
    threads = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        return _replay(record)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("key", ["logits_train", "loss", "logits_eval_after"])
def test_forward(record, replay, key):
    assert_checked(replay[key], record[key], record["ref64"][key], FORWARD_FLOOR, key)


def test_input_grad(record, replay):
    key = "input_grad"
    assert_checked(replay[key], record[key], record["ref64"][key], GRADIENT_FLOOR, key)


@pytest.mark.parametrize("key", ["grads_raw", "grads_final", "state_after"])
def test_per_tensor(record, replay, key):
    expected, truth = record[key], record["ref64"][key]
    assert list(replay[key]) == list(expected), f"{key}: keys differ"
    for name, value in expected.items():
        ours = replay[key][name]
        if not value.is_floating_point():  # num_batches_tracked
            assert torch.equal(ours, value), f"{key}[{name}]"
            continue
        assert_checked(ours, value, truth[name], GRADIENT_FLOOR, f"{key}[{name}]")


def test_layer_figures(record, replay):
    stats = replay["stats"]
    assert [s["name"] for s in stats] == record["binary_layers"]
    for key in ("ags_ratio", "silent_ratio"):
        ours = [s[key] for s in stats]
        assert_checked(ours, record[key], record["ref64"][key], FORWARD_FLOOR, key)


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


def test_record_is_float32_noise_from_float64(record):
    # The bound rests on upstream's record being float32 rounding of the float64 truth:
    # well under 1e-4 everywhere, or 2x its error would let a real bug through.
    truth = record["ref64"]
    for key in ("grads_raw", "grads_final", "state_after"):
        for name, value in record[key].items():
            if value.is_floating_point():
                assert rel_err(value, truth[key][name]) < 3e-5, f"{key}[{name}]"
    for key in ("logits_train", "loss", "input_grad", "logits_eval_after"):
        assert rel_err(record[key], truth[key]) < 1e-5, key


# -- the check refuses wrong answers ---------------------------------------------------


def _perturbed(t: torch.Tensor, rel: float) -> torch.Tensor:
    """``t`` with its largest-magnitude element moved by ``rel`` of the largest magnitude."""
    out = t.clone()
    flat = out.view(-1)
    i = flat.abs().argmax()
    flat[i] += rel * flat[i].abs().clamp_min(1e-30)
    return out


@pytest.mark.parametrize("key", ["grads_raw", "grads_final", "state_after"])
def test_check_rejects_a_gradient_off_by_1e3(record, key):
    # Every tensor the check accepts from the record itself, it must refuse once one
    # element is off by 1e-3 relative, including those where upstream's own float32
    # error is largest (layer1.0.conv2.weight: 2.7e-5 from float64).
    for name, value in record[key].items():
        if not value.is_floating_point():
            continue
        truth = record["ref64"][key][name]
        assert check(value, value, truth, GRADIENT_FLOOR) is None
        bad = _perturbed(value, 1e-3)
        assert check(bad, value, truth, GRADIENT_FLOOR) is not None, f"{key}[{name}]"


@pytest.mark.parametrize(
    "key, floor",
    [
        ("logits_train", FORWARD_FLOOR),
        ("logits_eval_after", FORWARD_FLOOR),
        ("input_grad", GRADIENT_FLOOR),
    ],
)
def test_check_rejects_values_off_by_1e4(record, key, floor):
    value, truth = record[key], record["ref64"][key]
    assert check(value, value, truth, floor) is None
    assert check(_perturbed(value, 1e-4), value, truth, floor) is not None, key


def test_check_accepts_float32_noise(record):
    # The other side: an answer as far from float64 as upstream's own record (here, the
    # float64 truth moved by upstream's error in the opposite direction) passes.
    value = record["grads_raw"]["layer1.0.conv2.weight"]
    truth = record["ref64"]["grads_raw"]["layer1.0.conv2.weight"]
    mirrored = (2 * truth.double() - value.double()).float()
    assert check(mirrored, value, truth, GRADIENT_FLOOR) is None
