"""``python -m ovsw.analysis plot RUN_DIR [RUN_DIR ...] [-o FILE]``: the per-layer
never-flipped and silent shares of one run folder, or of several side by side (vanilla
against OvSW). A user's mistake ends the program with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._plot import plot_runs
from ._records import MonitorDataError, read_run

PROG = "python -m ovsw.analysis"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Figures of the flip monitor's records.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plot = sub.add_parser(
        "plot",
        help="per-layer never-flipped and silent shares over epochs",
        description="Draw the never-flipped and silent shares of each binary layer over "
        "epochs from the silent.csv of each run folder; several runs side by side.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="ovsw-train run folders")
    plot.add_argument(
        "-o",
        "--output",
        default=None,
        help="PNG to write (default: RUN_DIR/silent_weights.png for one run, "
        "silent_weights.png here for several)",
    )
    plot.add_argument(
        "--labels", nargs="+", default=None, help="column titles (default: folder names)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [read_run(d) for d in args.run_dirs]
        if args.labels is not None and len(args.labels) != len(runs):
            raise MonitorDataError(f"{len(args.labels)} --labels for {len(runs)} run folders")
        if args.output is not None:
            out = Path(args.output)
        elif len(runs) == 1:
            out = Path(args.run_dirs[0]) / "silent_weights.png"
        else:
            out = Path("silent_weights.png")
        plot_runs(runs, out, labels=args.labels)
    except (MonitorDataError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: cannot write the figure ({e.strerror or e}{where})", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
