"""``python -m ovsw.deploy profile FILE``: where a deployed network's time goes.

Runs the file's network on random images of the size it was exported for (or
``--size``) and prints every op's median time over ``--repeats`` runs, its share of
the whole, and the stem's share: the full-precision ops before the first binary conv
(ResNet-18's 7x7 conv and max pool), which the binary layers cannot speed up. The
batch runs op by op, each op splitting its rows over the threads (``Engine.profile``),
not in the per-thread sub-batches a call on several images per thread uses.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from . import OpTime, load


def stem(times: list[OpTime]) -> list[OpTime]:
    """The ops before the first binary conv (all of them when there is none)."""
    for i, t in enumerate(times):
        if t.op == "bconv2d":
            return times[:i]
    return list(times)


def median_times(engine, x: np.ndarray, repeats: int) -> list[OpTime]:
    """Each op's median time over ``repeats`` profiled runs (after one warm-up run)."""
    engine.profile(x)
    runs = [engine.profile(x)[1] for _ in range(repeats)]
    return [
        first._replace(seconds=statistics.median(r[i].seconds for r in runs))
        for i, first in enumerate(runs[0])
    ]


def report(times: list[OpTime]) -> str:
    """The table of ops with their share, and the stem's line."""
    total = sum(t.seconds for t in times) or float("nan")
    rows = [f"{'#':>3}  {'op':<14} {'name':<28} {'output (NCHW)':<20} {'ms':>8} {'share':>6}"]
    for i, t in enumerate(times):
        shape = "x".join(map(str, t.shape))
        rows.append(
            f"{i:>3}  {t.op:<14} {t.name:<28} {shape:<20} {t.seconds * 1e3:>8.3f} "
            f"{t.seconds / total:>6.1%}"
        )
    s = stem(times)
    s_time = sum(t.seconds for t in s)
    names = ", ".join(t.name for t in s) or "none"
    rows.append(
        f"stem (the ops before the first binary conv: {names}): {s_time * 1e3:.3f} ms, "
        f"{s_time / total:.1%} of {total * 1e3:.3f} ms"
    )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ovsw.deploy profile",
        description="Time each op of a deployed network on this machine.",
    )
    parser.add_argument("file", help="a file written by ovsw.deploy.export")
    parser.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="engine threads (default 1)")
    parser.add_argument("--size", type=int, help="input height and width (default: the export's)")
    parser.add_argument("--repeats", type=int, default=5, help="runs, medians shown (default 5)")
    parser.add_argument("--kernel", default="auto", help="binary-conv kernel (default: the best)")
    args = parser.parse_args(argv)
    for name in ("batch", "threads", "size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be positive, got {value}")
    try:
        engine = load(args.file, threads=args.threads, kernel=args.kernel)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    inp = engine.metadata.get("input", {})
    h = w = args.size
    if h is None:
        h, w = inp.get("height"), inp.get("width")
    if not (isinstance(h, int) and isinstance(w, int)):
        print(f"error: {args.file} records no input size: pass --size", file=sys.stderr)
        return 1
    x = np.random.default_rng(0).standard_normal(
        (args.batch, inp.get("channels", 3), h, w), dtype=np.float32
    )
    try:
        times = median_times(engine, x, args.repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: {engine.metadata.get('arch', '?')}, input {x.shape[1]}x{h}x{w}, "
        f"batch {args.batch}, {engine.threads} threads, kernel {engine.kernel}"
    )
    print(report(times))
    return 0
