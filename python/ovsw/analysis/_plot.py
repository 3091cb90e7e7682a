"""Figures of the flip monitor's records (matplotlib, imported only here and only when
a figure is drawn; headless: no pyplot, no display)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._records import TOTAL, RunFlips, atomic_write, read_run

__all__ = ["plot_runs", "plot_comparison"]

_ROWS = (("never_flipped", "never flipped"), ("silent", "silent (tracker < threshold)"))


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "drawing the figures needs matplotlib: pip install matplotlib "
            '(it comes with pip install "ovsw[train]")'
        ) from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def _runs(runs: Sequence[str | os.PathLike | RunFlips]) -> list[RunFlips]:
    return [r if isinstance(r, RunFlips) else read_run(r) for r in runs]


def _percent_axis(ax: Any) -> None:
    ax.set_ylim(-2, 102)
    ax.yaxis.set_major_formatter("{x:.0f}%")
    ax.grid(alpha=0.3)


def _epoch_axis(ax: Any, last: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(-0.15, last + 0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _with_start(run: RunFlips, figure: str, layer: str) -> tuple[list[int], list[float]]:
    """Epochs and percentages; never-flipped starts at 100% at epoch 0 by definition."""
    xs, ys = list(run.epochs), [100.0 * v for v in run.series(figure, layer)]
    if figure == "never_flipped" and run.epochs[0] == 1:
        xs, ys = [0, *xs], [100.0, *ys]
    return xs, ys


def plot_runs(
    runs: Sequence[str | os.PathLike | RunFlips],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
) -> Path:
    """Per-layer never-flipped and silent shares over epochs: one column per run (side
    by side, e.g. vanilla against OvSW), one line per binary layer (colour by depth)
    and the total in black. ``runs`` are run folders (their ``silent.csv``) or
    :class:`RunFlips`. Writes a PNG to ``path`` (atomically) and returns it."""
    flips = _runs(runs)
    if labels is not None:
        if len(labels) != len(flips):
            raise ValueError(f"{len(labels)} labels for {len(flips)} runs")
        for r, label in zip(flips, labels):
            r.label = label
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    fig = _figure(1.2 + 3.6 * len(flips), 5.6)
    axes = fig.subplots(2, len(flips), squeeze=False, sharey=True)
    for col, run in enumerate(flips):
        layers = [n for n in run.layers if n != TOTAL]
        for row, (figure, title) in enumerate(_ROWS):
            ax = axes[row][col]
            for i, layer in enumerate(layers):
                color = cmap(i / max(1, len(layers) - 1))
                xy = _with_start(run, figure, layer)
                ax.plot(*xy, color=color, lw=0.9, alpha=0.8, marker=".", ms=3)
            xy = _with_start(run, figure, TOTAL)
            ax.plot(*xy, color="black", lw=2.2, marker="o", ms=3, label="all layers")
            _percent_axis(ax)
            _epoch_axis(ax, max(r.epochs[-1] for r in flips))
            ax.set_title(f"{run.label}: {title}", fontsize=9)
        axes[0][col].legend(loc="lower left", fontsize=8, frameon=False)
    if flips:
        sm = _colorbar_mappable(cmap, len([n for n in flips[0].layers if n != TOTAL]))
        fig.colorbar(sm, ax=axes, label="binary layer (input to output)", shrink=0.8)
    return _save(fig, path)


def _colorbar_mappable(cmap: Any, n: int) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(1, max(2, n)), cmap=cmap)


def plot_comparison(
    groups: Mapping[str, Sequence[str | os.PathLike | RunFlips]], path: str | os.PathLike
) -> Path:
    """Variants side by side (e.g. ``{"vanilla": [...], "OvSW": [...]}``, each a list
    of runs over seeds): the never-flipped and silent shares of all binary weights over
    epochs (mean over the runs, the band from min to max), and each layer's
    never-flipped share at the end (mean over the runs). Writes a PNG to ``path``."""
    import numpy as np

    data = {name: _runs(runs) for name, runs in groups.items()}
    fig = _figure(13.0, 3.8)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.6]})
    colors = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
    for (name, runs), color in zip(data.items(), colors):
        for ax, (figure, title) in zip(axes[:2], _ROWS):
            curves = [_with_start(r, figure, TOTAL) for r in runs]
            xs = curves[0][0]
            if any(c[0] != xs for c in curves):
                raise ValueError(f"the {name} runs did not record the same epochs")
            ys = np.array([c[1] for c in curves])
            ax.plot(xs, ys.mean(0), color=color, lw=2, marker="o", ms=3, label=name)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)
            ax.set_title(f"{title}, all binary weights", fontsize=9)
            _epoch_axis(ax, xs[-1])
            _percent_axis(ax)
    width = 0.8 / max(1, len(data))
    for k, ((name, runs), color) in enumerate(zip(data.items(), colors)):
        layers = [n for n in runs[0].layers if n != TOTAL]
        ys = np.array([[100.0 * r.last("never_flipped", n) for n in layers] for r in runs])
        xs = np.arange(len(layers)) + (k - (len(data) - 1) / 2) * width
        axes[2].bar(xs, ys.mean(0), width, color=color, label=name)
    axes[2].set_title("never flipped at the end, per binary layer", fontsize=9)
    axes[2].set_xlabel("binary layer (input to output)")
    axes[2].set_xticks(range(len(layers)), [str(i + 1) for i in range(len(layers))], fontsize=7)
    _percent_axis(axes[2])
    axes[0].legend(fontsize=8, frameon=False)
    return _save(fig, path)
