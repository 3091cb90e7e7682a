"""``silent.csv``: the flip monitor's figures per epoch, per layer and in total, as a
training run records them in its folder; written atomically, read back for plots."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._monitor import FIGURES

__all__ = [
    "SILENT_CSV",
    "CSV_FIELDS",
    "TOTAL",
    "MonitorDataError",
    "RunFlips",
    "epoch_rows",
    "write_epoch",
    "read_run",
]

#: The file name in a run folder.
SILENT_CSV = "silent.csv"
#: Its columns: the epoch (1 = after the first), the optimizer steps monitored so far,
#: the layer (``total`` for all binary weights), its number of weights, then the
#: figures of :data:`~ovsw.analysis.FIGURES` as shares in [0, 1] (``flipped``: at the
#: epoch's last step).
CSV_FIELDS = ("epoch", "step", "layer", "weights", *FIGURES)
#: The ``layer`` of the row over all binary weights.
TOTAL = "total"


class MonitorDataError(ValueError):
    """A run folder without readable flip-monitor data (one-line message)."""


def epoch_rows(stats: Sequence[dict[str, Any]], total: dict[str, Any], epoch: int, step: int):
    """The rows of one epoch: ``stats`` (:meth:`FlipMonitor.stats`) then ``total``."""
    return [
        {"epoch": epoch, "step": step, "layer": s["name"], "weights": s["weights"]}
        | {k: s[k] for k in FIGURES}
        for s in (*stats, total)
    ]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over
    ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _format(value: Any) -> str:
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def write_epoch(run_dir: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Add one epoch's ``rows`` (:func:`epoch_rows`) to ``RUN_DIR/silent.csv``; rows of
    that epoch or later already there (a resumed run going over them again) are
    replaced. Returns the file's path."""
    path = Path(run_dir) / SILENT_CSV
    epoch = int(rows[0]["epoch"])
    kept: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    w.writerows({k: _format(r[k]) for k in CSV_FIELDS} for r in rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))
    return path


@dataclass
class RunFlips:
    """One run's ``silent.csv``: the epochs recorded, the layers in model order
    (``total`` last), and per figure and layer the values by epoch."""

    run_dir: Path
    label: str
    epochs: list[int]
    steps: list[int]
    layers: list[str]
    weights: dict[str, int]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def series(self, figure: str, layer: str = TOTAL) -> list[float]:
        """``figure`` of ``layer`` by epoch."""
        return self.values[figure][layer]

    def last(self, figure: str, layer: str = TOTAL) -> float:
        """``figure`` of ``layer`` at the last epoch recorded."""
        return self.values[figure][layer][-1]


def read_run(run_dir: str | os.PathLike, label: str | None = None) -> RunFlips:
    """The flip-monitor figures of a run folder (its ``silent.csv``). Raises
    :class:`MonitorDataError` (one line) when there is none or it cannot be read."""
    run_dir = Path(run_dir)
    path = run_dir / SILENT_CSV
    if not run_dir.is_dir():
        raise MonitorDataError(f"{run_dir} is not a folder")
    if not path.is_file():
        raise MonitorDataError(
            f"{run_dir} has no flip-monitor data (no {SILENT_CSV}; ovsw-train writes it "
            "after every epoch)"
        )
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != CSV_FIELDS:
                raise MonitorDataError(
                    f"{path}: not a flip-monitor file (columns {reader.fieldnames}, "
                    f"expected {', '.join(CSV_FIELDS)})"
                )
            rows = list(reader)
        epochs: list[int] = []
        steps: list[int] = []
        layers: list[str] = []
        weights: dict[str, int] = {}
        values: dict[str, dict[str, list[float]]] = {k: {} for k in FIGURES}
        for r in rows:
            epoch, layer = int(r["epoch"]), r["layer"]
            if not epochs or epochs[-1] != epoch:
                if epochs and epoch <= epochs[-1]:
                    raise MonitorDataError(f"{path}: epoch {epoch} follows epoch {epochs[-1]}")
                epochs.append(epoch)
                steps.append(int(r["step"]))
            if layer not in weights:
                if len(epochs) > 1:
                    raise MonitorDataError(f"{path}: layer {layer} appears after epoch 1")
                layers.append(layer)
                weights[layer] = int(r["weights"])
            for k in FIGURES:
                v = float(r[k])
                if not (0.0 <= v <= 1.0) and not math.isnan(v):
                    raise MonitorDataError(f"{path}: {k} of {layer} is {v}, not a share")
                values[k].setdefault(layer, []).append(v)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, MonitorDataError):
            raise
        raise MonitorDataError(f"{path}: cannot read it ({e})") from None
    if not epochs or TOTAL not in weights:
        raise MonitorDataError(f"{path}: holds no epoch (the run stopped before its first)")
    for k in FIGURES:
        for layer, vs in values[k].items():
            if len(vs) != len(epochs):
                raise MonitorDataError(f"{path}: layer {layer} misses an epoch")
    layers = [n for n in layers if n != TOTAL] + [TOTAL]
    return RunFlips(run_dir, label or run_dir.name, epochs, steps, layers, weights, values)
