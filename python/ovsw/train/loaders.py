"""The loaders a run reads: the data sets of ``--set`` in ``DataLoader`` batches, or the
DALI pipelines with ``--dali``; each rank's share under ``--distributed``.

Training order depends only on (seed, epoch, rank), so a resumed run reads exactly the
batches an uninterrupted one does.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import data as datasets
from . import distributed
from .args import num_classes
from .errors import CLIError

__all__ = [
    "IN_MEMORY_SETS",
    "load_datasets",
    "loader",
    "dali_loader",
    "val_loader",
    "val_batch",
    "train_loaders",
]

#: Data sets held in memory as tensors: read without worker processes.
IN_MEMORY_SETS = ("Digits", "FashionMNIST")


def val_batch(args: argparse.Namespace) -> int:
    """The validation batch: ``batch_size // 4`` on ImageNet (upstream's), else
    ``batch_size``."""
    return max(1, args.batch_size // 4) if args.set == "ImageNet" else args.batch_size


def loader(
    ds: Dataset, args, batch_size: int, *, shuffle: bool, epoch: int, device, dist_info=None
) -> DataLoader:
    """A ``DataLoader`` over ``ds``: shuffled in an order drawn from (seed, epoch) when
    ``shuffle``; under ``--distributed`` this rank's share at ``batch_size / world``."""
    in_memory = args.set in IN_MEMORY_SETS or isinstance(ds, TensorDataset)
    workers = 0 if in_memory else args.workers
    gen = sampler = None
    if shuffle:
        # The order (and the workers' seeds) depend only on seed and epoch, so a resumed
        # run sees exactly the batches an uninterrupted one does.
        gen = torch.Generator().manual_seed((args.seed or 0) + epoch)
    if dist_info is not None:
        # Each rank takes batch_size / world size samples of its share.
        batch_size = max(1, batch_size // dist_info.world_size)
        if shuffle:
            sampler = distributed.train_sampler(ds, dist_info, seed=args.seed or 0, epoch=epoch)
            gen.manual_seed((args.seed or 0) + epoch + 7919 * dist_info.rank)  # worker seeds
        else:
            sampler = distributed.ShardSampler(len(ds), dist_info.rank, dist_info.world_size)
        shuffle = False
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=gen,
        drop_last=False,
    )


def dali_loader(args, train: bool, batch_size: int, device, dist_info=None):
    """A DALI loader over <data>/<imagenet|cifar10|cifar100>/{train,val} (this rank's
    shard); train loaders read epoch e after ``set_epoch(e)``."""
    from . import dali

    folder = Path(args.data).expanduser() / dali.FOLDERS[args.set] / ("train" if train else "val")
    if not folder.is_dir():
        hint = "one sub-folder of images per class"
        if args.set != "ImageNet":
            hint = (
                f"write them from torchvision's {args.set} with: python -m ovsw.train.dali "
                f"export-cifar --data {args.data} --set {args.set} [--download]"
            )
        raise CLIError(f"{args.set} image folders not found: looked for {folder} (--dali); {hint}")
    world = dist_info.world_size if dist_info else 1
    make = dali.imagenet_loader if args.set == "ImageNet" else dali.cifar_loader
    try:
        loader = make(
            folder,
            train,
            max(1, batch_size // world),
            device=device,
            shard_id=dist_info.rank if dist_info else 0,
            num_shards=world,
            num_threads=max(1, args.workers),
            seed=args.seed or 0,
        )
    except FileNotFoundError as e:
        raise CLIError(f"{args.set} (--dali): {e}") from None
    if loader.num_classes > num_classes(args):
        raise CLIError(
            f"{folder} holds {loader.num_classes} class folders but the model has "
            f"{num_classes(args)} outputs (--num-classes)"
        )
    return loader


def val_loader(args, val_set, device, dist_info=None):
    """The validation loader: DALI with ``--dali``, else this rank's share of ``val_set``."""
    if args.dali:
        return dali_loader(args, False, val_batch(args), device, dist_info)
    return loader(
        val_set, args, val_batch(args), shuffle=False, epoch=0, device=device, dist_info=dist_info
    )


def load_datasets(args: argparse.Namespace, need_train: bool = True):
    """The training side of ``--set`` (``None`` unless ``need_train``) and its
    validation side; missing data is a one-line :class:`~ovsw.train.errors.CLIError`."""
    # Run folders written before --augment and --native-size existed lack them.
    options = {
        "download": args.download,
        "augment": getattr(args, "augment", True),
        "native_size": getattr(args, "native_size", False),
    }
    try:
        train = datasets.build(args.set, True, args.data, **options) if need_train else None
        val = datasets.build(args.set, False, args.data, **options)
    except datasets.DataNotFoundError as e:
        raise CLIError(str(e)) from None
    return train, val


def train_loaders(args, train_set, device, dist_info=None) -> Callable[[int], Iterable]:
    """``epoch -> `` that epoch's training loader (this rank's share): a DataLoader over
    ``train_set`` shuffled from (seed, epoch), or with ``--dali`` the DALI loader set to
    read that epoch's pipeline."""
    if not args.dali:
        return lambda epoch: loader(
            train_set,
            args,
            args.batch_size,
            shuffle=True,
            epoch=epoch,
            device=device,
            dist_info=dist_info,
        )
    dali_train = dali_loader(args, True, args.batch_size, device, dist_info)

    def for_epoch(epoch: int):
        dali_train.set_epoch(epoch)  # order and augmentation from (seed, epoch, rank)
        return dali_train

    return for_epoch
