"""Multi-process training on ``torch.distributed`` for ``ovsw-train --distributed True``.

    torchrun --nproc_per_node 4 -m ovsw --distributed True --config ... --batch-size 512

One process per device (GPU, or a share of the CPU), each holding a full replica wrapped
in ``DistributedDataParallel``. The data is split by a ``DistributedSampler`` (seeded
with ``--seed`` and re-shuffled per epoch with ``set_epoch``), each rank takes
``batch_size // world_size`` samples a step, and DDP averages the gradients during
``backward``. :class:`ovsw.OvSW` then applies AGS and SAD to those all-reduced
gradients in ``step()``, so every rank holds the same weights and the same SAD trackers
without any extra communication. Progress, logs, checkpoints and the results CSV come
from rank 0 only.

The process group is set up from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) when it is there, else from
``--rank``, ``--world-size`` and ``--dist-url``. The backend is NCCL on CUDA and gloo on
the CPU unless ``--dist-backend`` names one.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

__all__ = [
    "DistInfo",
    "ShardSampler",
    "env_world_size",
    "init",
    "shutdown",
    "wrap",
    "unwrap",
    "train_sampler",
    "reduce_sums",
    "broadcast_bn_stats",
    "main_process_output",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size, its local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size(default: int = 1) -> int:
    """The world size torchrun set (``WORLD_SIZE``), else ``default``."""
    return int(os.environ.get("WORLD_SIZE", default))


def _pick_backend(requested: str | None, cuda: bool) -> str:
    if requested and requested.lower() not in ("auto", "none"):
        return requested.lower()
    return "nccl" if cuda else "gloo"


def init(
    *,
    rank: int = 0,
    world_size: int = 1,
    dist_url: str = "tcp://127.0.0.1:23456",
    backend: str | None = None,
    use_cuda: bool | None = None,
) -> DistInfo:
    """Join the process group (torchrun's ``env://`` variables win over the arguments)
    and pick this process's device: ``cuda:LOCAL_RANK`` when CUDA is used, else the CPU.
    """
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    env = os.environ
    rank = int(env.get("RANK", rank))
    world_size = int(env.get("WORLD_SIZE", world_size))
    ndev = torch.cuda.device_count() if use_cuda else 0
    local_rank = int(env.get("LOCAL_RANK", rank % ndev if ndev else rank))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
    if use_cuda:
        if local_rank >= ndev:
            raise ValueError(f"local rank {local_rank} has no GPU ({ndev} visible)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    chosen = _pick_backend(backend, use_cuda)
    if not dist.is_initialized():
        init_method = "env://" if "MASTER_ADDR" in env and "MASTER_PORT" in env else dist_url
        kwargs = {}
        if chosen == "nccl" and use_cuda:
            kwargs["device_id"] = device  # binds NCCL to this rank's GPU up front
        dist.init_process_group(
            chosen, init_method=init_method, rank=rank, world_size=world_size, **kwargs
        )
    return DistInfo(rank, world_size, local_rank, device, chosen)


def shutdown() -> None:
    """Wait for every rank, then leave the process group (a no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def wrap(model: nn.Module, info: DistInfo, *, sync_bn: bool = False) -> DistributedDataParallel:
    """``model`` (already on ``info.device``) in ``DistributedDataParallel``; with
    ``sync_bn`` on CUDA its BatchNorm layers become ``SyncBatchNorm`` first (in place:
    the module keeps its parameter tensors, so the names in a checkpoint do not change).

    Call it before building :class:`ovsw.OvSW`: the SAD buffers OvSW creates are then
    not among the buffers DDP re-broadcasts from rank 0, and stay identical on every
    rank only because every rank computes them from the same all-reduced gradients."""
    if sync_bn and info.device.type == "cuda":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # a bare BatchNorm model: replaced, not converted
            raise ValueError("--sync-bn needs a model that contains its BatchNorm layers")
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or DataParallel) wrapper; ``model`` itself otherwise."""
    if isinstance(model, (nn.DataParallel, DistributedDataParallel)):
        return model.module
    return model


def train_sampler(dataset, info: DistInfo, *, seed: int, epoch: int) -> DistributedSampler:
    """This rank's share of a shuffled epoch: the permutation depends only on ``seed``
    and ``epoch`` (as the single-process loader's), so a resumed run sees exactly the
    batches an uninterrupted one does. Short tails are padded by repeating samples, so
    every rank runs the same number of steps."""
    sampler = DistributedSampler(
        dataset,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    return sampler


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: every sample exactly once across
    the ranks (no padding), for validation."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def reduce_sums(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """Sum ``values`` over the ranks (returned unchanged outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    if device is None:  # NCCL reduces CUDA tensors only
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def broadcast_bn_stats(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s BatchNorm running statistics to every rank.

    DDP broadcasts buffers at the start of each training forward, so after an epoch's
    last step the ranks' running statistics differ by that one local update; rank 0's are
    the ones a checkpoint keeps, and validation uses them on every rank. (SAD buffers
    are left alone: they agree because the gradients do.)"""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for buf in m.buffers(recurse=False):
                dist.broadcast(buf, src)


@contextlib.contextmanager
def main_process_output(info: DistInfo | None):
    """Inside, ``print`` is silent on ranks other than 0 (``print(..., force=True)``
    still prints); restored on exit."""
    if info is None or info.is_main:
        yield
        return
    original = builtins.print

    def quiet_print(*args, force: bool = False, **kwargs):
        if force:
            original(*args, **kwargs)

    builtins.print = quiet_print
    try:
        yield
    finally:
        builtins.print = original
