"""``ovsw-train`` records the flip monitor (silent.csv, TensorBoard, silent_weights.png,
checkpoints), ``python -m ovsw.analysis plot``, and ``ovsw-experiment silent-weights``
(issue 14), with the paper's claim checked on real Fashion-MNIST in a shortened run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ovsw import analysis
from ovsw.analysis import __main__ as analysis_cli
from ovsw.train import checkpoints, cli, experiment
from ovsw.train import data as datasets

DIGITS = "configs/smallscale/w1a1-ovsw-resnet20-digits.yaml"
TINY = ["--batch-size", "8", "--limit-batches", "2", "-p", "1"]
PNG = b"\x89PNG\r\n\x1a\n"
# cResNet20's 18 binary convs: 6 of 16x16, 1 of 32x16, 5 of 32x32, 1 of 64x32, 5 of 64x64 (3x3)
CRESNET20_BINARY_WEIGHTS = 9 * (6 * 16 * 16 + 32 * 16 + 5 * 32 * 32 + 64 * 32 + 5 * 64 * 64)


def _run_dir(logs: Path, name="default") -> Path:
    return logs / "w1a1-ovsw-resnet20-digits" / name


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


def test_ovsw_train_records_the_flips(tmp_path, capsys):
    logs = tmp_path / "runs"
    assert cli.main(["--config", DIGITS, "--epochs", "2", "--log-dir", str(logs), *TINY]) == 0
    out = capsys.readouterr().out
    assert "never flipped " in out
    run_dir = _run_dir(logs)
    flips = analysis.read_run(run_dir)
    assert flips.epochs == [1, 2] and flips.steps == [2, 4]
    assert (
        len(flips.layers) == 19
        and flips.layers[0] == "layer1.0.conv1"
        and flips.layers[-1] == "total"
    )
    assert flips.weights["total"] == CRESNET20_BINARY_WEIGHTS
    layers = flips.layers[:-1]
    for figure in analysis.FIGURES:
        for e in range(2):
            weighted = sum(flips.series(figure, n)[e] * flips.weights[n] for n in layers)
            assert flips.series(figure, "total")[e] == pytest.approx(
                weighted / flips.weights["total"], rel=1e-6
            )
    never = flips.series("never_flipped")
    assert 0 < never[1] <= never[0] < 1
    assert _is_png(run_dir / "silent_weights.png")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "flips/never_flipped/total", "flips/silent/layer1.0.conv1",
        "flips/flip_rate/layer3.2.conv2", "flips/flipped/total",
    } <= scalars  # fmt: skip
    hist = events.Histograms("tracker/layer1.0.conv1")
    assert [h.step for h in hist] == [0, 1]
    assert hist[-1].histogram_value.num == 16 * 16 * 9

    ckpt = torch.load(run_dir / "checkpoints" / "checkpoint.pth", weights_only=True)
    state = ckpt["flip_monitor"]
    assert state["steps"] == 4 and state["sad_tracker"] is True  # the digits config runs SAD
    assert state["names"][0] == "layer1.0.conv1" and len(state["names"]) == 18


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_continues_the_never_flipped_count_exactly(tmp_path, monkeypatch):
    base = ["--config", DIGITS, "--epochs", "3", *TINY, "--lr", "0.5", "--enable_dampen", "False"]
    straight = cli.run([*base, "--log-dir", str(tmp_path / "a")])["run_dir"]

    save = checkpoints.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if Path(path).name == "checkpoint.pth" and state["epoch"] == 2:
            raise _Stop

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(_Stop):
        cli.run([*base, "--log-dir", str(tmp_path / "b")])
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    first = _run_dir(tmp_path / "b")
    resumed = cli.run([*base, "--log-dir", str(tmp_path / "b"), "--resume", str(first)])["run_dir"]
    assert resumed == first

    assert (straight / "silent.csv").read_text() == (resumed / "silent.csv").read_text()
    a = torch.load(straight / "checkpoints" / "checkpoint.pth", weights_only=True)["flip_monitor"]
    b = torch.load(resumed / "checkpoints" / "checkpoint.pth", weights_only=True)["flip_monitor"]
    assert a["sad_tracker"] is False and a["steps"] == b["steps"] == 6
    for key in ("sign", "ever_flipped", "tracker"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert torch.equal(a["rates"], b["rates"])
    never = analysis.read_run(straight).series("never_flipped")
    assert never[2] < never[0]  # the count went on across the resume point


def test_plot_command(tmp_path, capsys):
    logs = tmp_path / "runs"
    for name in ("vanilla", "ovsw"):
        flags = ["--enable_ags", "True"] if name == "ovsw" else []
        argv = ["--config", DIGITS, "--epochs", "1", "--log-dir", str(logs), "--name", name]
        assert cli.main([*argv, *TINY, *flags]) == 0
    capsys.readouterr()
    a, b = _run_dir(logs, "vanilla"), _run_dir(logs, "ovsw")
    (a / "silent_weights.png").unlink()
    assert analysis_cli.main(["plot", str(a)]) == 0
    assert _is_png(a / "silent_weights.png")
    both = tmp_path / "both.png"
    assert analysis_cli.main(["plot", str(a), str(b), "-o", str(both)]) == 0
    assert _is_png(both) and both.stat().st_size < 400_000
    capsys.readouterr()

    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, needle in (
        (["plot", str(empty)], "no flip-monitor data"),
        (["plot", str(tmp_path / "nowhere")], "is not a folder"),
        (["plot", str(a), "--labels", "x", "y"], "2 --labels for 1 run"),
    ):
        assert analysis_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    (empty / "silent.csv").write_text("a,b\n1,2\n")
    assert analysis_cli.main(["plot", str(empty)]) == 2
    assert "not a flip-monitor file" in capsys.readouterr().err
    # the module runs as a program too
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.analysis", "plot", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_native_size_and_no_augmentation(tmp_path):
    from test_cli import _fake_fashion_mnist

    _fake_fashion_mnist(tmp_path)
    plain = datasets.build("FashionMNIST", True, tmp_path, augment=False, native_size=True)
    assert plain.transform is None and plain[0][0].shape == (3, 28, 28)
    padded = datasets.build("FashionMNIST", True, tmp_path)
    assert padded.transform is not None and padded[0][0].shape == (3, 32, 32)
    # the same pixels, 2 black pixels a side apart
    assert torch.equal(padded.tensors[0][:, :, 2:30, 2:30], plain.tensors[0])
    assert datasets.build("Digits", False, native_size=True)[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="native_size"):
        datasets.build("ImageNet", True, tmp_path, native_size=True)


# -- ovsw-experiment ----------------------------------------------------------------------------

SHORT = ["--set", "Digits", "--epochs", "1", "--seeds", "1", "--limit-batches", "2"]


def test_experiment_end_to_end_on_digits_then_continued(tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["silent-weights", *SHORT, "--out", str(out), "--", "--batch-size", "16"]
    assert experiment.main(argv) == 0
    text = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    # the console gives each claim once, with the verdict results.json holds
    for key, claim in experiment.CLAIMS.items():
        verdict = "holds" if doc["claims"][key] else "does NOT hold"
        assert text.count(f": {claim}\n") == 1 and f"  {verdict}: {claim}\n" in text, text
    assert [(r["variant"], r["seed"]) for r in doc["runs"]] == [("vanilla", 1), ("ovsw", 1)]
    for r in doc["runs"]:
        assert Path(r["run_dir"]) == out / "runs" / "silent-weights" / f"{r['variant']}-seed1"
        assert 0 <= r["never_flipped"] <= 1 and 0 <= r["top1"] <= 100
        assert r["seconds"] > 0
        flips = analysis.read_run(r["run_dir"])
        assert r["never_flipped"] == flips.last("never_flipped")
        args = (Path(r["run_dir"]) / "args.yaml").read_text()
        assert "batch_size: 16" in args and "native_size: true" in args and "augment: false" in args
    vanilla, ovsw_args = ((Path(r["run_dir"]) / "args.yaml").read_text() for r in doc["runs"])
    assert "enable_ags: false" in vanilla and "dampen_weight: 0.0" in vanilla
    assert "enable_ags: true" in ovsw_args and "dampen_weight: 0.0009" in ovsw_args
    assert set(doc["claims"]) == set(experiment.CLAIMS)
    assert doc["summary"]["ovsw"]["top1"]["n"] == 1
    report = (out / "report.md").read_text()
    assert doc["command"] in report and "| vanilla | 1 |" in report
    for png in ("silent_weights.png", "layers.png"):
        assert _is_png(out / png)
    assert (out / "silent-weights.yaml").is_file()

    # the same command again: nothing to train, the same results
    started = time.time()
    assert experiment.main(argv) == 0
    assert "finished before" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in doc["runs"]]
    assert all(r["seconds"] is None for r in again["runs"]) and time.time() - started < 120

    # another recipe in the same folder is refused
    assert experiment.main([*argv[:-2], "--batch-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another recipe" in err


def _rc(argv) -> int:
    try:
        return experiment.main(argv)
    except SystemExit as e:  # argparse's own one-line errors
        return int(e.code)


def test_experiment_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    out = tmp_path / "exp"
    for argv, needle in (
        (["silent-weights", "--data", str(tmp_path), "--out", str(out)], "Fashion-MNIST not found"),
        (["silent-weights", "--set", "Digits", "--seeds", "1", "1", "--out", str(out)], "repeats"),
        (["silent-weights", "--set", "Nope", "--out", str(out)], "invalid choice"),
        (["silent-weights", "--epochs", "0", "--out", str(out)], "--epochs"),
        (["other"], "invalid choice"),
        (["silent-weights", "--set", "Digits", "--out", str(out), "--", "--lr", "x"], "--lr"),
    ):
        rc = _rc(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, (argv, err)
        assert not out.exists()  # nothing written before the checks
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert _rc(["silent-weights", *SHORT, "--out", str(tmp_path / "taken")]) == 2
    assert "not an experiment's folder" in capsys.readouterr().err


def test_console_script_is_one_line_on_missing_data(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.train.experiment", "silent-weights", "--set", "CIFAR10",
         "--data", str(tmp_path), "--out", str(tmp_path / "exp")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("ovsw-experiment: error: CIFAR-10 not found")


# -- the claim on real data ---------------------------------------------------------------------


def _require_fashion_mnist() -> None:
    """Skip without Fashion-MNIST, except where OVSW_REQUIRE_FASHION_MNIST=1 (CI sets
    it, after installing Debian's dataset-fashion-mnist): there a missing data set is a
    failure, never a silent skip."""
    try:
        datasets.fashion_mnist(False)
    except datasets.DataNotFoundError as e:
        if os.environ.get("OVSW_REQUIRE_FASHION_MNIST") == "1":
            pytest.fail(f"OVSW_REQUIRE_FASHION_MNIST=1 but {e}")
        pytest.skip(str(e))


#: The claim test's shortened recipe (flags of ``ovsw-experiment silent-weights``): the
#: experiment's defaults (real Fashion-MNIST at 28x28, no augmentation, cResNet20_1w1a,
#: 4 epochs of SGD with momentum 0.9, cosine per epoch, weight decay 5e-4, lambda 9e-4),
#: each epoch cut to 23 batches of 32 images and validated on the first 23 x 32 = 736
#: test images; seeds 1 and 2. The full recipe's 4 x 469 = 1876 steps of 128 images are
#: 92 steps of 32 here, so lr 0.1 becomes 0.02 and AGS's delta 0.04 becomes 1.5: AGS
#: lifts every channel's gradient norm to at least delta times its weights' norm, so a
#: first-epoch OvSW step moves a channel by lr x delta = 3% of its norm or more (0.4% in
#: the full recipe), while vanilla, with no AGS, keeps its small steps.
CLAIM_RECIPE = [
    "--epochs", "4", "--batch-size", "32", "--limit-batches", "23",
    "--lr", "0.02", "--delta", "1.5", "--seeds", "1", "2",
]  # fmt: skip
CLAIM_SEEDS = (1, 2)
#: The paper's claim as the claim test asserts it, on every seed: vanilla's never-flipped
#: share exceeds OvSW's by at least this much ...
NEVER_FLIPPED_GAP = 0.15
#: ... OvSW's share is under this ...
OVSW_NEVER_FLIPPED_BELOW = 0.5
# ... and OvSW's top-1 is strictly higher than vanilla's.


def claim_failures(runs: list[dict]) -> list[str]:
    """What fails of the paper's claim in ``runs`` (``results.json``'s per-run records:
    variant, seed, top1, never_flipped), seed by seed; empty when it holds on every seed
    of CLAIM_SEEDS. A missing run, or a figure that is not a finite number, fails."""
    failures = []
    for seed in CLAIM_SEEDS:
        pair = {r["variant"]: r for r in runs if r["seed"] == seed}
        if set(pair) != {"vanilla", "ovsw"}:
            failures.append(f"seed {seed}: runs {sorted(pair)}, not vanilla and ovsw")
            continue
        v, o = pair["vanilla"], pair["ovsw"]
        figures = (v["never_flipped"], o["never_flipped"], v["top1"], o["top1"])
        if not all(isinstance(x, float) and math.isfinite(x) for x in figures):
            failures.append(f"seed {seed}: a figure is not a finite number: {figures}")
            continue
        gap = v["never_flipped"] - o["never_flipped"]
        if not gap >= NEVER_FLIPPED_GAP:
            failures.append(f"seed {seed}: never-flipped gap {gap:.4f} < {NEVER_FLIPPED_GAP}")
        if not o["never_flipped"] < OVSW_NEVER_FLIPPED_BELOW:
            failures.append(
                f"seed {seed}: OvSW never flipped {o['never_flipped']:.4f} "
                f">= {OVSW_NEVER_FLIPPED_BELOW}"
            )
        if not o["top1"] > v["top1"]:
            failures.append(f"seed {seed}: OvSW top-1 {o['top1']:.2f} <= vanilla {v['top1']:.2f}")
    return failures


@pytest.fixture(scope="module")
def claim_experiment(tmp_path_factory):
    """The experiment on CLAIM_RECIPE (four runs: vanilla and OvSW, seeds 1 and 2); its
    results.json as read back from disk."""
    _require_fashion_mnist()
    out = tmp_path_factory.mktemp("claim") / "exp"
    experiment.silent_weights([*CLAIM_RECIPE, "--out", str(out)])
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_the_claim_holds_on_fashion_mnist_in_a_shortened_run(claim_experiment):
    """The paper's observation on real Fashion-MNIST, on both seeds: vanilla's
    never-flipped share exceeds OvSW's by at least 0.15, OvSW's is under one half, and
    OvSW's top-1 is higher. Measured on this recipe (AMD EPYC Zen 3, seeds 1 and 2, at 1
    and at 2 threads): gaps 0.546 to 0.549, OvSW's share 0.429 to 0.432, OvSW's top-1
    (64 to 72%) above vanilla's (27 to 38%) by 33 to 45 points; seeds 3 to 6 alike."""
    doc = claim_experiment
    assert sorted((r["variant"], r["seed"]) for r in doc["runs"]) == sorted(
        (v, s) for v in ("vanilla", "ovsw") for s in CLAIM_SEEDS
    )
    assert claim_failures(doc["runs"]) == [], doc["runs"]
    # the experiment's own verdicts (report.md, the console) agree
    assert all(doc["claims"].values()), doc["claims"]


def ablated_runs(doc: dict) -> list[dict]:
    """``doc``'s vanilla runs, and the OvSW arm trained again on its recipe and seeds with
    AGS and SAD switched off (the OvSW flags, then ``--enable_ags False --enable_dampen
    False``), as per-run records. The experiment passes extra flags to both arms alike,
    so these runs go through ovsw-train itself, with the experiment's own recipe file."""
    out = Path(doc["out"])
    a = experiment.build_parser().parse_args(["silent-weights", *CLAIM_RECIPE])
    runs = [r for r in doc["runs"] if r["variant"] == "vanilla"]
    for seed in CLAIM_SEEDS:
        result = cli.run(
            ["--config", str(out / "silent-weights.yaml"), *experiment.VARIANTS["ovsw"](a),
             "--enable_ags", "False", "--enable_dampen", "False", "--seed", str(seed),
             "--name", f"ovsw-no-ags-no-sad-seed{seed}", "--log-dir", str(out / "ablation")]
        )  # fmt: skip
        args = (Path(result["run_dir"]) / "args.yaml").read_text()
        assert "enable_ags: false" in args and "enable_dampen: false" in args, args
        runs.append(
            {
                "variant": "ovsw",
                "seed": seed,
                "top1": float(result["acc1"]),
                "never_flipped": analysis.read_run(result["run_dir"]).last("never_flipped"),
            }
        )
    return runs


@pytest.mark.slow
def test_the_claim_fails_without_ags_and_sad(claim_experiment):
    """The claim test's recipe with AGS and SAD switched off in the OvSW arm, against the
    claim test's vanilla runs: the claim check refuses it, both never-flipped claims on
    both seeds."""
    runs = ablated_runs(claim_experiment)
    failures = claim_failures(runs)
    for seed in CLAIM_SEEDS:
        assert sum(f.startswith(f"seed {seed}: never-flipped gap") for f in failures) == 1, runs
        assert sum(f.startswith(f"seed {seed}: OvSW never flipped") for f in failures) == 1, runs


def _runs(vanilla_share: float, ovsw_share: float, top1_gain: float) -> list[dict]:
    """Per-run records of both seeds with these never-flipped shares and OvSW's top-1
    ``top1_gain`` points above vanilla's 40%."""
    return [
        rec
        for seed in CLAIM_SEEDS
        for rec in (
            dict(variant="vanilla", seed=seed, never_flipped=vanilla_share, top1=40.0),
            dict(variant="ovsw", seed=seed, never_flipped=ovsw_share, top1=40.0 + top1_gain),
        )
    ]


def test_claim_failures_refuses_each_missing_margin():
    assert claim_failures(_runs(0.9, 0.4, 1.0)) == []
    assert claim_failures(_runs(0.5499, 0.4, 1.0))  # gap 0.1499, under 0.15
    assert claim_failures(_runs(0.9, 0.5, 1.0))  # OvSW's share must be under one half
    assert claim_failures(_runs(0.9, 0.4, 0.0))  # equal top-1 is not higher
    runs = _runs(0.9, 0.4, 1.0)
    runs[3]["top1"] = float("nan")
    assert claim_failures(runs)
    assert claim_failures(_runs(0.9, 0.4, 1.0)[:3])  # a run missing
