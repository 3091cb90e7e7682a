"""See the silent weights: per-layer sign-flip analytics of binary networks.

The paper's finding (OvSW, ECCV 2024) is that in a vanilla binary network most latent
weights never flip sign during training; AGS and SAD free them. This package measures
it in any training loop, with any optimizer:

>>> import ovsw.analysis
>>> monitor = ovsw.analysis.FlipMonitor(model, opt)   # opt: optional (SAD's tracker)
>>> ...  # after every opt.step():
>>> monitor.update()
>>> monitor.stats()    # per binary layer: flipped, never_flipped, silent, flip_rate
>>> monitor.total()    # the same over all binary weights

- :class:`FlipMonitor`: the counting (in the Rust core, figures kept on the device);
- ``silent.csv`` (:func:`epoch_rows`, :func:`write_epoch`, :func:`read_run`): the
  figures per epoch in a run folder, as ``ovsw-train`` records them;
- :func:`plot_runs`, :func:`plot_comparison`: the figures (matplotlib, imported only
  when drawing);
- ``python -m ovsw.analysis plot RUN_DIR [RUN_DIR ...]``: one run's figure, or several
  side by side.

Like the rest of the library it needs only torch and numpy (plus matplotlib to draw).
"""

from ._monitor import FIGURES, TRACKER_EDGES, FlipMonitor
from ._plot import plot_comparison, plot_runs
from ._records import (
    CSV_FIELDS,
    SILENT_CSV,
    TOTAL,
    MonitorDataError,
    RunFlips,
    epoch_rows,
    read_run,
    write_epoch,
)

__all__ = [
    "FIGURES",
    "TRACKER_EDGES",
    "FlipMonitor",
    "CSV_FIELDS",
    "SILENT_CSV",
    "TOTAL",
    "MonitorDataError",
    "RunFlips",
    "epoch_rows",
    "write_epoch",
    "read_run",
    "plot_runs",
    "plot_comparison",
]
