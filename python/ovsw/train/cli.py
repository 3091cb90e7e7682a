"""``ovsw-train`` (also ``python -m ovsw`` and ``python -m ovsw.train``): upstream's
``main.py`` workflow (SPEC section 5).

    ovsw-train --config configs/smallscale/w1a1-ovsw-resnet20-digits.yaml
    ovsw-train --config ./configs/largescale/w1a1-ovsw-resnet18-imagenet.yaml \\
        --forward-type xnor --name xnor_200_0.00002_0.01000 --epochs 200 --delta 0.01000 \\
        --seed 42 --enable_ags True --enable_dampen True --dampen_weight 2e-05 \\
        --set ImageNet --scaling_factor False --batch-size 512 --warmup_length 5

This module sets a run up and tears it down: the device (or the process group under
``--distributed``), data, model, optimizer, ``--pretrained`` / ``--resume``, the run
folder; :func:`ovsw.train.loop.fit` does the epochs. Flags: :mod:`ovsw.train.args`; run
folders and the results CSV: :mod:`ovsw.train.runs`.

Every user mistake ends the program with status 2 and one line ``ovsw-train: error:
...`` on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import analysis
from . import checkpoints, distributed, loaders, loop, optimizers, runs
from .args import PROG, parse_args
from .errors import CLIError, first_line

__all__ = ["TRAIN_EXTRAS", "select_device", "train", "evaluate", "run", "main"]

#: What ``ovsw-train`` imports beyond the library (the ``ovsw[train]`` extra).
TRAIN_EXTRAS = ("yaml", "tqdm", "tensorboard", "torchvision", "sklearn", "matplotlib")


def select_device(gpu: int | None = None) -> torch.device:
    """The device of a single-process run, made current when it is a GPU: ``cuda:<gpu>``
    with ``--gpu``, else the current CUDA device when CUDA is there, else the CPU. A CUDA
    device always carries its index (``torch.cuda.set_device`` refuses a bare
    ``"cuda"``)."""
    if gpu is not None:
        device = torch.device("cuda", gpu)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        return torch.device("cpu")
    torch.cuda.set_device(device)
    return device


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _in_process_group(fn, args, *rest):
    """``fn(args, *rest, dist_info)``: inside a process group with ``--distributed``
    (joined here, left at the end), else with ``dist_info=None``."""
    if not args.distributed:
        return fn(args, *rest, None)
    use_cuda = args.gpu is not None or torch.cuda.is_available()
    try:
        info = distributed.init(
            rank=args.rank,
            world_size=args.world_size,
            dist_url=args.dist_url,
            backend=args.dist_backend,
            use_cuda=use_cuda,
        )
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"--distributed: {e}") from None
    ok = False
    try:
        with distributed.main_process_output(info):
            result = fn(args, *rest, info)
        ok = True
        return result
    finally:
        if ok:
            distributed.shutdown()  # waits for every rank
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """``--evaluate``: top-1 / top-5 on the validation side (no run folder written)."""
    return _in_process_group(_evaluate, args)


def _evaluate(args, dist_info) -> dict[str, float]:
    device = dist_info.device if dist_info else select_device(args.gpu)
    _seed_everything(args.seed or 0)
    val_set = None if args.dali else loaders.load_datasets(args, need_train=False)[1]
    model = runs.build_model(args, device)
    if args.pretrained:
        # --evaluate scores this very model: a checkpoint that does not fit is refused
        source = f"--pretrained {args.pretrained}"
        checkpoints.load_into(model, args.pretrained, source, args.arch, device, strict=True)
    else:
        print("warning: --evaluate without --pretrained evaluates a freshly initialised model")
    criterion = nn.CrossEntropyLoss()
    val_loader = loaders.val_loader(args, val_set, device, dist_info)
    loss, acc1, acc5 = loop.validate(model, val_loader, criterion, device, args)
    print(f"top-1 {acc1:.2f}%  top-5 {acc5:.2f}%  loss {loss:.4f}")
    return {"acc1": acc1, "acc5": acc5, "loss": loss}


def train(args: argparse.Namespace, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Train as upstream's main.py does; returns the summary figures and the run folder
    (``None`` on ranks other than 0 under ``--distributed``)."""
    return _in_process_group(_train, args, argv)


def _train(args, argv: Sequence[str], dist_info) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    device = dist_info.device if dist_info else select_device(args.gpu)
    _seed_everything(args.seed or 0)
    train_set = val_set = None
    if not args.dali:
        train_set, val_set = loaders.load_datasets(args, need_train=True)
    model = runs.build_model(args, device)
    if args.pretrained:
        # fine-tuning: keys that do not fit are reported and skipped (SPEC section 5)
        source = f"--pretrained {args.pretrained}"
        checkpoints.load_into(model, args.pretrained, source, args.arch, device, strict=False)
    # DDP wraps the model before OvSW is built (see distributed.wrap)
    net = distributed.wrap(model, dist_info, sync_bn=args.sync_bn) if dist_info else model
    opt = optimizers.build_ovsw(net, args)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing or 0.0)
    # The flip monitor reads SAD's trackers when SAD runs, else keeps its own.
    monitor = analysis.FlipMonitor(model, opt)
    run = loop.Run(args, device, model, net, opt, scaler, criterion, dist_info, monitor=monitor)
    if args.resume:
        _resume(run)
    if args.start_epoch is not None:
        run.start_epoch = args.start_epoch
    if run.is_main:
        run.run_dir = runs.open_run_dir(args, argv)
        run.writer = SummaryWriter(log_dir=str(run.run_dir / "logs"))
    try:
        run.train_loader = loaders.train_loaders(args, train_set, device, dist_info)
        run.val_loader = loaders.val_loader(args, val_set, device, dist_info)
        where = f"{device}" if dist_info is None else f"{dist_info.world_size} x {device.type}"
        print(
            f"{PROG}: {args.arch} on {args.set} ({where}), epochs "
            f"{run.start_epoch}..{args.epochs}, run folder {run.run_dir}"
        )
        loop.fit(run)
    finally:
        if run.writer is not None:
            run.writer.close()
    return _finish(run)


def _resume(run: loop.Run) -> None:
    """``--resume``: weights (a checkpoint of this very model only), optimizer and
    scaler state, the epoch to go on from and the accuracies so far."""
    args = run.args
    source = f"--resume {args.resume}"
    ckpt = checkpoints.load_into(run.model, args.resume, source, args.arch, run.device, strict=True)
    try:
        if "optimizer" in ckpt:
            run.opt.load_state_dict(ckpt["optimizer"])
        if run.scaler is not None and ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CLIError(
            f"{source}: its optimizer state does not fit --optimizer {args.optimizer} "
            f"({first_line(e)})"
        ) from None
    _resume_monitor(run, ckpt, source)
    run.start_epoch = int(ckpt.get("epoch", 0))
    for k in run.best:
        run.best[k] = float(ckpt.get(k, 0.0))
    run.curr_acc1 = float(ckpt.get("curr_acc1", 0.0))
    run.curr_acc5 = float(ckpt.get("curr_acc5", 0.0))
    print(f"resumed from {args.resume} at epoch {run.start_epoch}")


def _resume_monitor(run: loop.Run, ckpt: dict[str, Any], source: str) -> None:
    """The flip monitor's state from the checkpoint, so that the never-flipped count
    goes on exactly; a checkpoint without it restarts the count at the loaded weights."""
    state = ckpt.get("flip_monitor")
    if state is None:
        run.monitor.reset()
        print(f"note: {source} holds no flip-monitor state; never-flipped counts from here")
        return
    try:
        run.monitor.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CLIError(f"{source}: its flip-monitor state does not fit ({first_line(e)})") from None


def _finish(run: loop.Run) -> dict[str, Any]:
    """The results row (rank 0), the summary line, and the figures :func:`train`
    returns."""
    args, best = run.args, run.best
    silent = run.opt.mean_silent_ratio()
    row = {
        "date_finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "base_config": args.config or "",
        "name": args.name or "default",
        "run_dir": str(run.run_dir),
        "arch": args.arch,
        "set": args.set,
        "epochs": args.epochs,
        "curr_acc1": f"{run.curr_acc1:.2f}",
        "curr_acc5": f"{run.curr_acc5:.2f}",
        **{k: f"{v:.2f}" for k, v in best.items()},
        "mean_silent_fraction": loop.fmt(silent),
    }
    if run.is_main:
        runs.record_result(args, row)
    print(
        f"top-1 {run.curr_acc1:.2f}% (best {best['best_acc1']:.2f}%)  "
        f"mean silent fraction {loop.fmt(silent)}  run folder {run.run_dir}"
    )
    return {
        "acc1": run.curr_acc1,
        "acc5": run.curr_acc5,
        **best,
        "mean_silent_fraction": silent,
        "flips": run.monitor.total() if run.monitor is not None else None,
        "run_dir": run.run_dir,
        "model": run.model,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and evaluate or train; returns the figures (for scripts and tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.evaluate:
        return evaluate(args)
    return train(args, argv)


def _extras_error(missing: Sequence[str]) -> int:
    print(
        f"{PROG}: error: {', '.join(missing)} missing; ovsw-train needs the training "
        'extras: pip install "ovsw[train]"',
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ovsw-train`` console script: 0 on success, 2 on a user's mistake (one line
    on stderr), 130 when interrupted."""
    missing = [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        return _extras_error(missing)
    try:
        run(argv)
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_EXTRAS:
            raise
        return _extras_error([e.name])
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
