"""``ovsw-export RUN_DIR`` (``python -m ovsw.train.export RUN_DIR``): deploy a model
trained by ``ovsw-train``.

Rebuilds the model of the run folder with :func:`ovsw.train.runs.load_model` (its
``args.yaml`` and checkpoint), writes the deploy file with :func:`ovsw.deploy.export`
and, unless ``--no-check``, scores the engine and PyTorch side by side on the run's
validation set. Part of the training application (it reads run folders and datasets);
the library :mod:`ovsw.deploy` knows nothing of it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import _core
from ..deploy import export, load
from . import loaders, runs
from .errors import CLIError

PROG = "ovsw-export"


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    checkpoint: str = "best",
    check: bool = True,
    threads: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Export a run's checkpoint (``"best"``, ``"last"`` or a path) and, with ``check``,
    compare engine and PyTorch on the validation set. Returns the figures."""
    run_dir = Path(run_dir)
    trained = runs.load_model(run_dir, checkpoint)
    model, args, ckpt_path, state = trained.model, trained.args, trained.checkpoint, trained.state
    out = Path(out) if out is not None else run_dir / (ckpt_path.stem + ".ovsw")
    meta = {"run_dir": str(run_dir), "checkpoint": str(ckpt_path), "set": args.set}
    meta.update({k: state[k] for k in ("epoch", "best_acc1") if k in state})
    export(model, out, metadata=meta)
    result = {"file": str(out), "bytes": out.stat().st_size}
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB) from {ckpt_path}")
    if not check:
        return result
    _, val = loaders.load_datasets(args, need_train=False)
    engine = load(out, threads=threads)
    loader = torch.utils.data.DataLoader(val, batch_size=batch_size, shuffle=False)
    hits_torch = hits_engine = agree = total = 0
    t_torch = t_engine = 0.0
    with torch.no_grad():
        for x, y in loader:
            t = time.perf_counter()
            ref = model(x)
            t_torch += time.perf_counter() - t
            xn = x.numpy().astype(np.float32, copy=False)
            t = time.perf_counter()
            got = engine(xn)
            t_engine += time.perf_counter() - t
            p_torch, p_engine = ref.argmax(1).numpy(), got.argmax(1)
            hits_torch += int((p_torch == y.numpy()).sum())
            hits_engine += int((p_engine == y.numpy()).sum())
            agree += int((p_torch == p_engine).sum())
            total += len(y)
    result.update(
        samples=total,
        top1_torch=100.0 * hits_torch / total,
        top1_engine=100.0 * hits_engine / total,
        agreement=100.0 * agree / total,
        torch_seconds=t_torch,
        engine_seconds=t_engine,
    )
    print(
        f"validation ({args.set}, {total} images): top-1 PyTorch {result['top1_torch']:.2f}%, "
        f"engine {result['top1_engine']:.2f}%, same prediction {result['agreement']:.2f}%; "
        f"time PyTorch {t_torch:.2f} s, engine {t_engine:.2f} s "
        f"({engine.threads} threads, kernel {engine.kernel})"
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a model trained by ovsw-train to a deploy file.",
    )
    parser.add_argument("run_dir", help="the ovsw-train run folder (holds args.yaml)")
    parser.add_argument("-o", "--out", help="deploy file (default: RUN_DIR/model_best.ovsw)")
    parser.add_argument(
        "--checkpoint", default="best", help="'best' (default), 'last' or a checkpoint path"
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip scoring the engine on the validation set"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="engine threads (default and most: the CPUs this process may use)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    try:
        _core.deploy_threads(args.threads)  # the engine's check, before the export
    except ValueError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    try:
        export_run(
            args.run_dir,
            args.out,
            checkpoint=args.checkpoint,
            check=not args.no_check,
            threads=args.threads,
        )
    except CLIError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
