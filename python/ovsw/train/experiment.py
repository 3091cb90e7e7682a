"""``ovsw-experiment silent-weights``: the paper's experiment as one command.

OvSW's argument is an observation: in a vanilla binary network most latent weights
never flip sign during training, and AGS and SAD free them. This command trains both
with one recipe, on the same data and seeds, and writes the comparison:

- **vanilla**: no AGS, SAD with lambda 0 (its tracker runs, its decay does not);
- **OvSW**: AGS (``--delta``) and SAD (``--dampen-weight``).

Defaults: Fashion-MNIST, cResNet20_1w1a on the 28x28 images repeated to three channels,
normalised, no augmentation; batch 128; SGD lr 0.1, momentum 0.9, cosine per epoch,
weight decay 5e-4; 4 epochs; delta 0.04, lambda 9e-4; seeds 1 and 2; the device as
``ovsw-train`` picks it. Flags change the data set, the architecture, the epochs, the
seeds and the rest of the recipe; arguments after ``--`` go to every ``ovsw-train``
run as they are.

The output folder (``--out``) holds ``silent-weights.yaml`` (the recipe, an
``ovsw-train`` config), ``runs/silent-weights/<variant>-seed<k>/`` (ordinary
``ovsw-train`` run folders, each with its ``silent.csv`` and ``silent_weights.png``),
``results.json`` (per run: top-1 and the never-flipped, silent and flip-rate shares;
per variant: mean and spread over the seeds; whether each of the paper's claims holds),
``report.md``, ``silent_weights.png`` (vanilla against OvSW over epochs and per layer)
and ``layers.png`` (every run's layers side by side). Run it again with the same
flags to continue: finished runs are kept, interrupted ones resumed from their last
checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import analysis
from . import args as train_args
from . import checkpoints, cli, loaders, runs
from . import data as datasets
from .errors import CLIError, first_line, os_reason

__all__ = ["PROG", "VARIANTS", "CLAIMS", "recipe_flags", "silent_weights", "main"]

PROG = "ovsw-experiment"
RECIPE = "silent-weights"
#: The two variants: name -> the ``ovsw-train`` flags that make them.
VARIANTS = {
    "vanilla": lambda a: [
        "--enable_ags", "False", "--enable_dampen", "True", "--dampen_weight", "0"
    ],
    "ovsw": lambda a: [
        "--enable_ags", "True", "--enable_dampen", "True", "--dampen_weight", repr(a.dampen_weight)
    ],
}  # fmt: skip
LABELS = {"vanilla": "vanilla", "ovsw": "OvSW"}
#: The paper's three claims, as ``results.json`` names them.
CLAIMS = {
    "vanilla_mostly_never_flipped": "vanilla keeps more than half of its binary weights "
    "never flipped (every seed)",
    "ovsw_flips_most": "OvSW flips most of them: under half never flipped (every seed)",
    "ovsw_top1_higher": "OvSW's top-1 is higher (mean over seeds)",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="The paper's experiments, one command each.")
    sub = p.add_subparsers(dest="experiment", required=True, parser_class=_Parser)
    e = sub.add_parser(
        "silent-weights",
        help="vanilla against OvSW: never-flipped weights and top-1",
        description="Train vanilla (no AGS, SAD with lambda 0) and OvSW (AGS + SAD) with "
        "the same recipe, data and seeds; report top-1 and the never-flipped share per run "
        "and over seeds. Arguments after -- go to every ovsw-train run.",
    )
    B = dict(type=train_args.str2bool, metavar="BOOL")
    num = train_args._number
    e.add_argument(
        "--set", default="FashionMNIST", type=train_args._choice(datasets.SETS), help="data set"
    )
    e.add_argument("--data", default="./dataset", metavar="DIR", help="dataset base folder")
    e.add_argument("-a", "--arch", default="cResNet20_1w1a", type=train_args.parse_arch)
    e.add_argument("--epochs", default=4, type=num(int, lo=1), metavar="N")
    e.add_argument("--seeds", default=[1, 2], type=num(int, lo=0), nargs="+", metavar="SEED")
    e.add_argument("--out", default="runs/silent-weights", metavar="DIR", help="output folder")
    e.add_argument("-b", "--batch-size", default=128, type=num(int, lo=1), metavar="N")
    e.add_argument("--lr", default=0.1, type=num(float, lo=0))
    e.add_argument("--momentum", default=0.9, type=num(float, lo=0))
    e.add_argument("--wd", "--weight-decay", default=5e-4, type=num(float, lo=0), dest="wd")
    e.add_argument(
        "--delta", default=0.04, type=train_args._ovsw_option("delta"), help="OvSW: AGS delta"
    )
    e.add_argument("--dampen-weight", default=9e-4, type=num(float, lo=0), help="OvSW: SAD lambda")
    e.add_argument("--augment", default=False, help="training augmentation", **B)
    e.add_argument(
        "--native-size",
        default=True,
        help=f"{' and '.join(datasets.NATIVE_SIZE_SETS)} at their own size (ignored for the "
        "other sets)",
        **B,
    )
    e.add_argument(
        "--limit-batches",
        default=0,
        type=num(int, lo=0),
        metavar="N",
        help="a shortened run: at most N train and N validation batches per epoch",
    )
    e.add_argument("--gpu", default=None, type=num(int, lo=0), help="GPU index")
    return p


def recipe_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The recipe every run shares, as ``ovsw-train`` config keys (its flags' names)."""
    recipe: dict[str, Any] = {
        "arch": a.arch,
        "set": a.set,
        "data": a.data,
        "forward_type": "xnor",
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "optimizer": "sgd",
        "lr": a.lr,
        "lr_policy": "cosine_lr",
        "warmup_length": 0,
        "momentum": a.momentum,
        "weight_decay": a.wd,
        "augment": a.augment,
        "native_size": a.native_size and a.set in datasets.NATIVE_SIZE_SETS,
        "delta": a.delta,
        "enable_dampen": True,
        "limit_batches": a.limit_batches,
        "workers": 0 if a.set in loaders.IN_MEMORY_SETS else 4,
    }
    if a.gpu is not None:
        recipe["gpu"] = a.gpu
    return recipe


def _run_argv(config: Path, a, variant: str, seed: int, out: Path, extra: Sequence[str]):
    return [
        "--config", str(config), *VARIANTS[variant](a), "--seed", str(seed),
        "--name", f"{variant}-seed{seed}", "--log-dir", str(out / "runs"), *extra,
    ]  # fmt: skip


def _summary(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _finished(run_dir: Path, epochs: int) -> bool:
    ckpt = run_dir / "checkpoints" / "checkpoint.pth"
    if not ckpt.is_file():
        return False
    try:
        state = checkpoints.load_checkpoint(ckpt)
    except CLIError:
        return False
    return isinstance(state, dict) and int(state.get("epoch", 0)) >= epochs


def _result(variant: str, seed: int, run_dir: Path, seconds: float | None) -> dict[str, Any]:
    state = checkpoints.load_checkpoint(run_dir / "checkpoints" / "checkpoint.pth")
    flips = analysis.read_run(run_dir)
    return {
        "variant": variant,
        "seed": seed,
        "run_dir": str(run_dir),
        "epochs": int(state["epoch"]),
        "top1": float(state["curr_acc1"]),
        "best_top1": float(state["best_acc1"]),
        "never_flipped": flips.last("never_flipped"),
        "silent": flips.last("silent"),
        "flip_rate": flips.last("flip_rate"),
        "seconds": seconds,
    }


def _claims(results: list[dict[str, Any]]) -> dict[str, bool]:
    by = {v: [r for r in results if r["variant"] == v] for v in VARIANTS}
    mean_top1 = {v: sum(r["top1"] for r in rs) / len(rs) for v, rs in by.items()}
    return {
        "vanilla_mostly_never_flipped": all(r["never_flipped"] > 0.5 for r in by["vanilla"]),
        "ovsw_flips_most": all(r["never_flipped"] < 0.5 for r in by["ovsw"]),
        "ovsw_top1_higher": mean_top1["ovsw"] > mean_top1["vanilla"],
    }


def _pct(s: dict[str, float]) -> str:
    text = f"{100 * s['mean']:.1f}"
    return text + (f" ± {100 * s['std']:.1f}" if s["n"] > 1 else "")


def _report(doc: dict[str, Any]) -> str:
    lines = [
        "# Silent weights: vanilla against OvSW",
        "",
        f"Command: `{doc['command']}`",
        "",
        "Recipe (`silent-weights.yaml`, an `ovsw-train` config): "
        + ", ".join(f"{k} {v}" for k, v in doc["recipe"].items())
        + ". Vanilla: `"
        + " ".join(doc["variants"]["vanilla"])
        + "`; OvSW: `"
        + " ".join(doc["variants"]["ovsw"])
        + "`."
        + (f" Extra ovsw-train flags: `{' '.join(doc['extra'])}`." if doc["extra"] else ""),
        "",
        "Top-1 is the validation accuracy after the last epoch; the shares are over all "
        "binary (OvSWConv2d) weights after the last epoch: *never flipped* since training "
        "began, *silent* (SAD tracker below its threshold).",
        "",
        "| run | seed | top-1 (%) | best top-1 (%) | never flipped (%) | silent (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        lines.append(
            f"| {LABELS[r['variant']]} | {r['seed']} | {r['top1']:.2f} | {r['best_top1']:.2f} "
            f"| {100 * r['never_flipped']:.1f} | {100 * r['silent']:.1f} |"
        )
    lines += [
        "",
        "Over the seeds (mean ± standard deviation):",
        "",
        "| variant | top-1 (%) | never flipped (%) | silent (%) |",
        "|---|---:|---:|---:|",
    ]
    for v, s in doc["summary"].items():
        top1 = f"{s['top1']['mean']:.2f}" + (
            f" ± {s['top1']['std']:.2f}" if s["top1"]["n"] > 1 else ""
        )
        lines.append(f"| {LABELS[v]} | {top1} | {_pct(s['never_flipped'])} | {_pct(s['silent'])} |")
    lines += ["", "The paper's claims on this recipe:", ""]
    for key, text in CLAIMS.items():
        lines.append(f"- {'holds' if doc['claims'][key] else 'does NOT hold'}: {text}")
    lines += [
        "",
        "![vanilla against OvSW](silent_weights.png)",
        "",
        "Every run's layers: [layers.png](layers.png).",
        "",
    ]
    return "\n".join(lines)


def silent_weights(argv: Sequence[str]) -> dict[str, Any]:
    """Run the experiment (``argv``: the flags after ``silent-weights``, then
    optionally ``--`` and ovsw-train flags); returns what ``results.json`` holds."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    a = build_parser().parse_args(["silent-weights", *argv])
    if len(set(a.seeds)) != len(a.seeds):
        raise CLIError(f"--seeds: {' '.join(map(str, a.seeds))} repeats a seed")
    out = Path(a.out)
    config = out / f"{RECIPE}.yaml"
    recipe = recipe_flags(a)
    command = " ".join([PROG, "silent-weights", *map(shlex.quote, argv)])
    if extra:
        command += " -- " + " ".join(map(shlex.quote, extra))
    _check(a, recipe, extra)
    plan = {"recipe": recipe, "extra": extra, "variants": {v: f(a) for v, f in VARIANTS.items()}}
    _prepare(out, plan)
    runs.atomic_write_text(config, _yaml(recipe))
    results = []
    for seed in a.seeds:
        for variant in VARIANTS:
            run_dir = out / "runs" / RECIPE / f"{variant}-seed{seed}"
            seconds = None
            if not _finished(run_dir, a.epochs):
                run_argv = _run_argv(config, a, variant, seed, out, extra)
                if (run_dir / "checkpoints" / "checkpoint.pth").is_file():
                    run_argv += ["--resume", str(run_dir)]
                print(f"{PROG}: {LABELS[variant]}, seed {seed}: ovsw-train {shlex.join(run_argv)}")
                started = time.time()
                run_dir = Path(cli.run(run_argv)["run_dir"])
                seconds = time.time() - started
            else:
                print(f"{PROG}: {LABELS[variant]}, seed {seed}: finished before, in {run_dir}")
            results.append(_result(variant, seed, run_dir, seconds))
    doc = {
        "command": command,
        "out": str(out),
        **plan,
        "runs": results,
        "summary": {
            v: {
                k: _summary([r[k] for r in results if r["variant"] == v])
                for k in ("top1", "best_top1", "never_flipped", "silent")
            }
            for v in VARIANTS
        },
        "claims": _claims(results),
    }
    _write_outputs(out, doc)
    return doc


def _check(a: argparse.Namespace, recipe: dict[str, Any], extra: Sequence[str]) -> None:
    """Every run's flags parsed (a bad one ends the program as ``ovsw-train`` does, in
    one line) and the data looked for, before anything is written."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / f"{RECIPE}.yaml"
        config.write_text(_yaml(recipe))
        for variant in VARIANTS:
            parsed = train_args.parse_args(["--config", str(config), *VARIANTS[variant](a), *extra])
    loaders.load_datasets(parsed, need_train=False)


def _yaml(recipe: dict[str, Any]) -> str:
    import yaml

    head = "# The recipe of ovsw-experiment silent-weights (an ovsw-train config).\n"
    return head + yaml.safe_dump(recipe, sort_keys=False)


def _prepare(out: Path, plan: dict[str, Any]) -> None:
    """The output folder, with ``experiment.json`` (the plan); an existing one must
    hold the same plan (then its runs are continued)."""
    marker = out / "experiment.json"
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"{marker}: cannot read it ({first_line(e)})") from None
        if before != json.loads(json.dumps(plan)):
            raise CLIError(
                f"{out} holds an experiment with another recipe ({marker}); pass another --out"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} exists and is not an experiment's folder; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(marker, json.dumps(plan, indent=2) + "\n")
    except OSError as e:
        raise CLIError(f"cannot write the output folder {out} ({os_reason(e)})") from None


def _write_outputs(out: Path, doc: dict[str, Any]) -> None:
    groups = {
        LABELS[v]: [Path(r["run_dir"]) for r in doc["runs"] if r["variant"] == v] for v in VARIANTS
    }
    analysis.plot_comparison(groups, out / "silent_weights.png")
    order = [Path(r["run_dir"]) for r in doc["runs"]]
    labels = [f"{LABELS[r['variant']]}, seed {r['seed']}" for r in doc["runs"]]
    analysis.plot_runs(order, out / "layers.png", labels=labels)
    runs.atomic_write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
    runs.atomic_write_text(out / "report.md", _report(doc))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ovsw-experiment`` console script: 0 on success, 2 on a user's mistake (one
    line on stderr), 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = [m for m in cli.TRAIN_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"{PROG}: error: {', '.join(missing)} missing; {PROG} needs the training extras: "
            'pip install "ovsw[train]"',
            file=sys.stderr,
        )
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "silent-weights":
        build_parser().parse_args(argv)  # help, or the one-line error for the subcommand
        return 2
    try:
        doc = silent_weights(argv[1:])
    except (CLIError, analysis.MonitorDataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {os_reason(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted (run it again with the same flags to continue)", file=sys.stderr
        )
        return 130
    out = Path(doc["out"])
    print(f"{PROG}: wrote {out / 'report.md'}, {out / 'results.json'} and the figures")
    for key, text in CLAIMS.items():
        print(f"  {'holds' if doc['claims'][key] else 'does NOT hold'}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
