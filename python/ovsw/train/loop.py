"""The training loop: epochs of training and validation over one shared batch iteration,
the learning rate set once per epoch, checkpoints, TensorBoard scalars and progress.

Per training step (SPEC section 5): autocast forward (fp16 on CUDA), loss, ``zero_grad``,
(scaled) backward, unscale, ``OvSW.step`` (AGS and SAD, then the wrapped update), scaler
update, then the flip monitor (:class:`ovsw.analysis.FlipMonitor`) counts the sign
flips; top-1 and top-5 meters, summed over the ranks under ``--distributed``.

Nothing in a step copies to the host: the loss and accuracy meters and the monitor's
figures add up on the device and are read every ``--print-freq`` batches and at the end
of a pass, and the per-layer AGS/SAD figures (``OvSW.stats``) once per epoch. (Under
AMP, GradScaler's own inf check still reads one value per step.)

After every epoch rank 0 writes the checkpoints, TensorBoard scalars (loss, accuracy,
lr, per binary layer the silent fraction, AGS ratio and the monitor's figures) and
tracker histograms, and the monitor's figures to ``silent.csv``; at the end of the run
``silent_weights.png`` draws them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import analysis
from ..optim import OvSW
from . import checkpoints, distributed
from .errors import CLIError, os_reason
from .optimizers import lr_at

__all__ = [
    "BEST_KEYS",
    "Meter",
    "Run",
    "accuracy",
    "iterate",
    "train_epoch",
    "validate",
    "fit",
    "plot_flips",
]

BEST_KEYS = ("best_acc1", "best_acc5", "best_train_acc1", "best_train_acc5")


class Meter:
    """A running average weighted by batch size.

    ``update`` takes a number or a 0-d float64 tensor; tensors add up where they are
    (no copy to the host per update), in the same float64 arithmetic a number would
    get, and are read once when ``sum`` or ``avg`` is asked for."""

    def __init__(self) -> None:
        self._sum: float | torch.Tensor = 0.0
        self.n = 0

    def update(self, value: float | torch.Tensor, n: int) -> None:
        self._sum = self._sum + value * n
        self.n += n

    @property
    def sum(self) -> float:
        if isinstance(self._sum, torch.Tensor):
            self._sum = self._sum.item()  # the one read of everything added so far
        return self._sum

    @sum.setter
    def sum(self, value: float) -> None:
        self._sum = value

    @property
    def avg(self) -> float:
        return self.sum / max(1, self.n)


def accuracy_tensors(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list:
    """Top-k accuracies in percent (k capped at the number of classes), as float64 0-d
    tensors on ``output``'s device: computing them reads nothing back to the host."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices
    correct = pred.eq(target.view(-1, 1))
    return [correct[:, : min(k, maxk)].any(1).float().mean().double() * 100.0 for k in topk]


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Top-k accuracies in percent (k capped at the number of classes)."""
    return [a.item() for a in accuracy_tensors(output, target, topk)]


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _reduce_meters(*meters: Meter) -> None:
    """Under torch.distributed: every rank's meters become the sums over all ranks."""
    if not torch.distributed.is_initialized():
        return
    sums = distributed.reduce_sums([x for m in meters for x in (m.sum, m.n)])
    for k, m in enumerate(meters):
        m.sum, m.n = sums[2 * k], int(sums[2 * k + 1])


def _limit(loader, args: argparse.Namespace) -> int:
    n = len(loader)
    return min(n, args.limit_batches) if args.limit_batches else n


def iterate(
    model: nn.Module,
    loader,
    criterion: nn.Module,
    device: torch.device,
    args: argparse.Namespace,
    *,
    desc: str,
    step: Callable[[torch.Tensor], None] | None = None,
    on_log: Callable[[int, int, torch.Tensor], None] | None = None,
) -> tuple[float, float, float]:
    """One pass over ``loader`` (at most ``--limit-batches`` batches): each batch to
    ``device``, forward and loss under autocast (fp16 on CUDA), ``step(loss)`` when
    training, then the loss and top-1/top-5 meters. ``on_log(i, total, loss)`` runs
    every ``--print-freq`` batches. Returns the mean loss, top-1 and top-5 (over all
    ranks)."""
    from tqdm import tqdm

    loss_m, top1, top5 = Meter(), Meter(), Meter()
    total = _limit(loader, args)
    amp = device.type == "cuda"
    bar = tqdm(total=total, desc=desc, leave=False, disable=None if _is_main() else True)
    for i, (x, y) in enumerate(loader):
        if i >= total:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = criterion(out, y)
        if step is not None:
            step(loss)
        # Added up on the device; read at the print interval below and at the end.
        a1, a5 = accuracy_tensors(out.detach().float(), y)
        loss_m.update(loss.detach().double(), len(y))
        top1.update(a1, len(y))
        top5.update(a5, len(y))
        bar.update(1)
        if on_log is not None and (i % args.print_freq == 0 or i == total - 1):
            bar.set_postfix(loss=f"{loss_m.avg:.4f}", top1=f"{top1.avg:.2f}")
            on_log(i, total, loss)
    bar.close()
    _reduce_meters(loss_m, top1, top5)
    return loss_m.avg, top1.avg, top5.avg


def train_epoch(model, loader, opt, criterion, scaler, device, epoch, args, writer, monitor=None):
    """One training epoch of ``model`` (the DDP wrapper under ``--distributed``);
    ``monitor`` (a :class:`~ovsw.analysis.FlipMonitor`) counts the flips of each step."""
    model.train()

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)  # OvSW.step: AGS + SAD, then the wrapped update
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if monitor is not None:
            monitor.update()  # on the device: no host copy

    def log(i: int, total: int, loss: torch.Tensor) -> None:
        if writer is not None:
            writer.add_scalar("train/loss_step", loss.item(), epoch * total + i)

    desc = f"epoch {epoch + 1}/{args.epochs} train"
    return iterate(model, loader, criterion, device, args, desc=desc, step=step, on_log=log)


@torch.no_grad()
def validate(model, loader, criterion, device, args, desc="val"):
    """Loss, top-1 and top-5 of ``model`` in eval mode over ``loader``."""
    model.eval()
    return iterate(model, loader, criterion, device, args, desc=desc)


@dataclass
class Run:
    """What the loop works on. ``model`` is the plain network (loading, validation,
    checkpoints: upstream's key names), ``net`` what trains (the DDP wrapper under
    ``--distributed``). ``run_dir`` and ``writer`` are ``None`` on ranks other than 0."""

    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    net: nn.Module
    opt: OvSW
    scaler: Any
    criterion: nn.Module
    dist_info: distributed.DistInfo | None = None
    train_loader: Callable[[int], Iterable] | None = None
    val_loader: Iterable | None = None
    run_dir: Path | None = None
    writer: Any = None
    start_epoch: int = 0
    best: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BEST_KEYS, 0.0))
    curr_acc1: float = 0.0
    curr_acc5: float = 0.0
    monitor: analysis.FlipMonitor | None = None

    @property
    def is_main(self) -> bool:
        return self.dist_info is None or self.dist_info.is_main

    def state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (upstream's dict, plus the scaler's state)."""
        return {
            "epoch": epoch + 1,
            "arch": self.args.arch,
            "state_dict": self.model.state_dict(),
            **self.best,
            "optimizer": self.opt.state_dict(),
            "curr_acc1": self.curr_acc1,
            "curr_acc5": self.curr_acc5,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "flip_monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }


def fit(run: Run) -> None:
    """Epochs ``start_epoch .. --epochs``: train, validate, then (rank 0) checkpoints,
    TensorBoard scalars and a progress line per epoch."""
    args, start = run.args, time.time()
    rank = run.dist_info.rank if run.dist_info else 0
    for epoch in range(run.start_epoch, args.epochs):
        lr = lr_at(args, epoch)
        for group in run.opt.param_groups:
            group["lr"] = lr
        torch.manual_seed((args.seed or 0) + epoch + 7919 * rank)  # augmentation RNG
        train = train_epoch(
            run.net,
            run.train_loader(epoch),
            run.opt,
            run.criterion,
            run.scaler,
            run.device,
            epoch,
            args,
            run.writer,
            run.monitor,
        )
        if run.dist_info is not None:
            distributed.broadcast_bn_stats(run.model)  # rank 0's, as its checkpoint keeps
        val = validate(run.model, run.val_loader, run.criterion, run.device, args)
        is_best = _update_figures(run, train, val)
        state = run.state(epoch)
        stats, silent = run.opt.stats(), run.opt.mean_silent_ratio()
        if not run.is_main:
            continue
        # silent.csv before the checkpoint: a run stopped in between repeats the epoch
        # when resumed, and its rows are replaced, never lost
        flips = _record_flips(run, epoch)
        _save_checkpoints(run, epoch, state, is_best)
        _log_epoch(run, epoch, lr, train, val, stats, silent)
        never = "" if flips is None else f"  never flipped {100 * flips['never_flipped']:.1f}%"
        print(
            f"epoch {epoch + 1}/{args.epochs}  lr {lr:.5f}  train loss {train[0]:.4f} "
            f"top-1 {train[1]:.2f}  val top-1 {run.curr_acc1:.2f} top-5 {run.curr_acc5:.2f}  "
            f"silent {fmt(silent)}{never}  ({time.time() - start:.0f}s)",
            flush=True,
        )
    if run.is_main:
        plot_flips(run)


def _update_figures(run: Run, train, val) -> bool:
    """The epoch's current and best accuracies; True on a new best top-1."""
    _, run.curr_acc1, run.curr_acc5 = val
    best = run.best
    is_best = run.curr_acc1 > best["best_acc1"]
    best["best_acc1"] = max(best["best_acc1"], run.curr_acc1)
    best["best_acc5"] = max(best["best_acc5"], run.curr_acc5)
    best["best_train_acc1"] = max(best["best_train_acc1"], train[1])
    best["best_train_acc5"] = max(best["best_train_acc5"], train[2])
    return is_best


def _save_checkpoints(run: Run, epoch: int, state: dict[str, Any], is_best: bool) -> None:
    folder = run.run_dir / "checkpoints"
    checkpoints.save(state, folder / "checkpoint.pth")
    if is_best:
        checkpoints.save(state, folder / "model_best.pth")
    every = run.args.save_every
    if every > 0 and (epoch + 1) % every == 0:
        checkpoints.save(state, folder / f"epoch_{epoch + 1}.pth")


def _log_epoch(run: Run, epoch: int, lr: float, train, val, stats, silent) -> None:
    """The epoch's TensorBoard scalars: loss and accuracy, lr, and per binary layer the
    silent fraction and the AGS ratio."""
    w = run.writer
    for tag, value in (
        ("train/loss", train[0]),
        ("train/acc1", train[1]),
        ("train/acc5", train[2]),
        ("val/loss", val[0]),
        ("val/acc1", val[1]),
        ("val/acc5", val[2]),
        ("lr", lr),
    ):
        w.add_scalar(tag, value, epoch)
    if silent is not None:
        w.add_scalar("silent/mean", silent, epoch)
    for s in stats:
        name = s["name"].removeprefix("module.")
        if s["silent_ratio"] is not None:
            w.add_scalar(f"silent/{name}", s["silent_ratio"], epoch)
        if s["ags_ratio"] is not None:
            w.add_scalar(f"ags_ratio/{name}", s["ags_ratio"], epoch)
    w.flush()


def _record_flips(run: Run, epoch: int) -> dict[str, Any] | None:
    """The flip monitor's figures after ``epoch``: rows in ``silent.csv`` (per layer
    and in total), TensorBoard scalars ``flips/<figure>/<layer>`` and a histogram of
    each layer's tracker values (``tracker/<layer>``). Returns the total (``None``
    when the epoch ran no step)."""
    monitor = run.monitor
    if monitor is None or monitor.steps == 0 or monitor.figures() is None:
        return None
    stats = monitor.stats()
    total = monitor.total(stats)
    rows = analysis.epoch_rows(stats, total, epoch + 1, monitor.steps)
    try:
        analysis.write_epoch(run.run_dir, rows)
    except OSError as e:
        raise CLIError(
            f"cannot write {run.run_dir / analysis.SILENT_CSV}: {os_reason(e)}"
        ) from None
    w = run.writer
    for row in rows:
        for figure in analysis.FIGURES:
            w.add_scalar(f"flips/{figure}/{row['layer']}", row[figure], epoch)
    for h in monitor.histogram():
        counts = h["counts"]
        w.add_histogram_raw(
            f"tracker/{h['name']}",
            min=h["min"],
            max=h["max"],
            num=sum(counts),
            sum=h["sum"],
            sum_squares=h["sum_squares"],
            bucket_limits=h["edges"][1:],
            bucket_counts=counts,
            global_step=epoch,
        )
    w.flush()
    return total


def plot_flips(run: Run) -> Path | None:
    """``silent_weights.png`` in the run folder from its ``silent.csv`` (``None`` when
    no epoch was recorded)."""
    if run.monitor is None or not (run.run_dir / analysis.SILENT_CSV).is_file():
        return None
    try:
        return analysis.plot_runs([run.run_dir], run.run_dir / "silent_weights.png")
    except analysis.MonitorDataError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(
            f"cannot write {run.run_dir / 'silent_weights.png'}: {os_reason(e)}"
        ) from None


def fmt(x: float | None, spec: str = ".4f") -> str:
    """``x`` formatted, ``n/a`` for None."""
    return "n/a" if x is None else format(x, spec)
