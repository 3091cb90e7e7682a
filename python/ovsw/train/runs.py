"""Run folders and what they hold, and the results CSV.

A run writes ``<log-dir>/<config stem>/<name>/`` (a numbered subfolder when that exists)
with ``logs/`` (TensorBoard), ``checkpoints/`` (``checkpoint.pth`` every epoch,
``model_best.pth`` on a new best), ``settings.txt`` and ``args.yaml``, and a row in
``<log-dir>/results.csv`` when it finishes. ``--resume`` of a run folder's checkpoint
without ``--name`` continues in that folder and updates its row.

:func:`load_model` rebuilds a run's trained model from its folder (``ovsw-export
RUN_DIR``, :mod:`ovsw.train.export`, uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from . import checkpoints
from .args import PROG, num_classes
from .errors import CLIError, first_line, os_reason

__all__ = [
    "RESULT_FIELDS",
    "RunModel",
    "build_model",
    "make_run_dir",
    "run_dir_of",
    "open_run_dir",
    "read_run_args",
    "write_settings",
    "record_result",
    "checkpoint_path",
    "load_model",
]


def build_model(args: argparse.Namespace, device: torch.device | str = "cpu") -> nn.Module:
    """The network of ``--arch`` with the run's classes and binary-conv options."""
    model = models.create(
        args.arch,
        num_classes=num_classes(args),
        act_a=args.act_a,
        act_w=args.act_w,
        scaling_factor=args.scaling_factor,
        forward_type=args.forward_type,
    )
    return model.to(device)


def _config_stem(args) -> str:
    return Path(args.config).stem if args.config else "no-config"


def make_run_dir(args) -> Path:
    """runs/<config stem>/<name>/, or a numbered subfolder of it when it exists."""
    base = Path(args.log_dir or "runs") / _config_stem(args) / (args.name or "default")
    run_dir = base
    if base.exists():
        n = 0
        while (base / str(n)).exists():
            n += 1
        run_dir = base / str(n)
    (run_dir / "logs").mkdir(parents=True, exist_ok=False)
    (run_dir / "checkpoints").mkdir()
    return run_dir


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The ``ovsw-train`` run folder that ``checkpoint`` belongs to: the folder itself
    when given one, ``RUN`` for ``RUN/checkpoints/<file>``; ``None`` for a checkpoint
    outside a run folder (one without args.yaml and checkpoints/)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        cand = path
    elif path.parent.name == "checkpoints":
        cand = path.parent.parent
    else:
        return None
    if (cand / "args.yaml").is_file() and (cand / "checkpoints").is_dir():
        return cand
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_run_dir(args, argv: Sequence[str]) -> Path:
    """The run folder, with settings.txt and args.yaml written: ``--resume RUN`` without
    ``--name`` continues in the checkpoint's own run folder (its name kept, settings.txt
    extended), anything else gets a new one (:func:`make_run_dir`). A folder that cannot
    be written is a :class:`CLIError`."""
    own = run_dir_of(args.resume) if args.resume and not args.name else None
    try:
        if own is not None:
            args.name = read_run_args(own).get("name") or None
            run_dir = own
        else:
            run_dir = make_run_dir(args)
        write_settings(run_dir, args, argv, resumed=own is not None)
    except OSError as e:
        where = own if own is not None else Path(args.log_dir or "runs")
        raise CLIError(f"cannot write the run folder under {where} ({os_reason(e)})") from None
    return run_dir


def read_run_args(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The flags a run was started with (its ``args.yaml``)."""
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "args.yaml").is_file():
        raise CLIError(f"{run_dir} is not an ovsw-train run folder (no args.yaml)")

    try:
        with open(run_dir / "args.yaml") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise CLIError(f"{run_dir / 'args.yaml'}: cannot read it ({first_line(e)})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"{run_dir / 'args.yaml'} is not an ovsw-train args file")
    return saved


def write_settings(run_dir: Path, args, argv: Sequence[str], resumed: bool = False) -> None:
    """settings.txt (the command and every flag; extended when ``resumed``) and
    args.yaml (the flags, readable as a ``--config``)."""
    import yaml

    lines = [f"command: {PROG} {' '.join(argv)}"]
    lines += [f"{k}: {v}" for k, v in sorted(vars(args).items())]
    with open(run_dir / "settings.txt", "a" if resumed else "w") as f:
        f.write(("\n# resumed\n" if resumed else "") + "\n".join(lines) + "\n")
    atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(vars(args), sort_keys=True))


RESULT_FIELDS = [
    "date_finished",
    "base_config",
    "name",
    "run_dir",
    "arch",
    "set",
    "epochs",
    "curr_acc1",
    "curr_acc5",
    "best_acc1",
    "best_acc5",
    "best_train_acc1",
    "best_train_acc5",
    "mean_silent_fraction",
]


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def record_result(args, row: dict[str, Any]) -> Path:
    """Write the results row of a finished run: the row of the same run folder is
    replaced where a results CSV holds one (a run continued by ``--resume``), else the
    row is appended to ``<log-dir>/results.csv``. Returns the CSV's path."""
    run_dir = Path(row["run_dir"])
    first = Path(args.log_dir or "runs") / "results.csv"
    # the log folder of run_dir: <log>/<stem>/<name> or <log>/<stem>/<name>/<n>
    for path in (first, *(p / "results.csv" for p in list(run_dir.parents)[1:3])):
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        hits = [i for i, r in enumerate(rows) if _same_dir(r.get("run_dir", ""), run_dir)]
        if hits:
            rows[hits[-1]] = row
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            atomic_write_text(path, buf.getvalue())
            return path
    new = not first.exists()
    with open(first, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    return first


def checkpoint_path(run_dir: str | os.PathLike, checkpoint: str = "best") -> Path:
    """``"best"``: ``RUN/checkpoints/model_best.pth``, ``"last"``: ``.../checkpoint.pth``,
    anything else: that path."""
    if checkpoint in ("best", "last"):
        name = "model_best.pth" if checkpoint == "best" else "checkpoint.pth"
        return Path(run_dir) / "checkpoints" / name
    return Path(checkpoint)


@dataclass
class RunModel:
    """A run's trained model (:func:`load_model`): the model in eval mode, the run's
    flags, the checkpoint file and the checkpoint dict it was loaded from."""

    model: nn.Module
    args: argparse.Namespace
    checkpoint: Path
    state: dict[str, Any]


def load_model(
    run_dir: str | os.PathLike, checkpoint: str = "best", *, device: torch.device | str = "cpu"
) -> RunModel:
    """Rebuild the model of an ``ovsw-train`` run folder from its ``args.yaml``
    (architecture, classes, binary-conv options) and load its checkpoint (``"best"``,
    ``"last"`` or a path; see :func:`checkpoint_path`) into it; the checkpoint must fit
    the model exactly. Raises :class:`~ovsw.train.errors.CLIError` (one line) for a
    folder that is not a run or a checkpoint that does not fit."""
    args = argparse.Namespace(**read_run_args(run_dir))
    path = checkpoint_path(run_dir, checkpoint)
    model = build_model(args, device)
    state = checkpoints.load_into(model, str(path), str(path), args.arch, device, strict=True)
    return RunModel(model.eval(), args, path, state)
