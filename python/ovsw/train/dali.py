"""NVIDIA DALI input pipelines for ``ovsw-train --dali True``: ImageNet-style and
CIFAR-style image folders.

Folders (``--data`` is the base folder, as without DALI)::

    <data>/imagenet/{train,val}/<class>/<image>      --set ImageNet
    <data>/cifar10/{train,val}/<class>/<image>.png   --set CIFAR10
    <data>/cifar100/{train,val}/<class>/<image>.png  --set CIFAR100

A class's label is the index of its folder among the sorted folder names (as
``torchvision.datasets.ImageFolder`` numbers them); files are read in sorted order.

**ImageNet** mirrors :func:`ovsw.train.data.imagenet_transforms`. Train: random resized crop of
224 with upstream's area range (0.08, 1.25), horizontal flip of half the images, PCA
lighting noise, normalisation. The lighting noise is :class:`ovsw.train.data.Lighting`: each
image gets the RGB offset ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, 0.1)`` per
image and component, added to the [0, 1] image before normalising; here it is folded
into a per-image normalisation mean, ``255 * (mean - offset)``. Validation: shorter side
resized to 256, center 224 crop, normalisation.

**CIFAR** mirrors :func:`ovsw.train.data.cifar`. Train: ``RandomCrop(32, padding=4)`` (the 32x32
window at a uniform offset of 0..8 pixels in each axis of the zero-padded 40x40 image),
horizontal flip of half the images, normalisation with CIFAR's mean and std. Validation:
normalisation only. The images are 32x32, as CIFAR's are (validation center-crops or
zero-pads any other size to 32x32).

CIFAR folders from torchvision's CIFAR-10 / CIFAR-100 (``<data>/cifar10/cifar-10-batches-py``,
what ``ovsw-train --set CIFAR10 --download True`` fetches)::

    python -m ovsw.train.dali export-cifar --data ./dataset --set CIFAR10 [--download]

writes every image losslessly as ``<data>/cifar10/{train,val}/<class>/<index>.png``
(train: the 50,000 training images, val: the 10,000 test images; ``<index>`` is the
image's position in torchvision's data set, zero-padded), see :func:`export_cifar`.

Decoding runs on the GPU ("mixed") when a device id is given and as a CPU-only pipeline
(``device_id=None``) otherwise.

**Exact resume.** Every epoch gets a fresh pipeline: its file order is a permutation
drawn from ``(seed, epoch)`` (the same on every rank; rank ``r`` of ``n`` reads the
``r``-th contiguous ``1/n`` of it) and its random operators (crop, flip, lighting) are
seeded from ``(seed, epoch, shard)``. Epoch ``e``'s batches are therefore the same
whether the process ran epochs ``0..e-1`` before or resumed from a checkpoint at ``e``
(:meth:`DALILoader.set_epoch`).

DALI is the optional extra ``ovsw[dali]`` (``pip install nvidia-dali-cuda130``); the
CIFAR export needs torchvision and Pillow only.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_PCA_EIGVAL,
    IMAGENET_PCA_EIGVEC,
    IMAGENET_STD,
)

__all__ = [
    "INSTALL_HINT",
    "FOLDERS",
    "available",
    "DALILoader",
    "image_files",
    "epoch_order",
    "epoch_seeds",
    "imagenet_pipeline",
    "imagenet_loader",
    "cifar_pipeline",
    "cifar_loader",
    "write_image_folder",
    "export_cifar",
    "main",
]

INSTALL_HINT = (
    "--dali True needs NVIDIA DALI: pip install 'ovsw[dali]' (or pip install nvidia-dali-cuda130)"
)
#: ``--set`` name -> the folder under ``--data`` holding ``train/`` and ``val/``.
FOLDERS = {"ImageNet": "imagenet", "CIFAR10": "cifar10", "CIFAR100": "cifar100"}
TRAIN_SCALE = (0.08, 1.25)
LIGHTING_STD = 0.1
CIFAR_SIZE, CIFAR_PADDING = 32, 4
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    try:
        from nvidia import dali
    except ImportError:
        raise ModuleNotFoundError(INSTALL_HINT, name="nvidia.dali") from None
    return dali


# -- files, order, seeds ------------------------------------------------------------------


def image_files(root: str | os.PathLike) -> tuple[list[str], list[int]]:
    """The images under ``root``'s class folders and their labels, in ``ImageFolder``'s
    order (classes and files sorted by name). Raises :class:`FileNotFoundError` naming
    ``root`` when it is no folder or holds no images in class folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for k, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(p))
                labels.append(k)
    if not files:
        raise FileNotFoundError(
            f"no images in class folders under {root} (expected {root}/<class>/<image>)"
        )
    return files, labels


def epoch_order(n: int, seed: int, epoch: int, num_shards: int = 1) -> np.ndarray:
    """The training order of ``n`` files in ``epoch``: a permutation drawn from
    ``(seed, epoch)`` alone (every rank draws the same one), cut to a multiple of
    ``num_shards`` so every rank takes the same number of steps."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[: n - n % num_shards]


def epoch_seeds(seed: int, epoch: int, shard_id: int, n: int = 4) -> list[int]:
    """``n`` seeds for the random operators of ``epoch``'s pipeline on ``shard_id``."""
    state = np.random.SeedSequence([seed, epoch, shard_id]).generate_state(n)
    return [int(s) & 0x7FFFFFFF for s in state]


def _check(batch_size: int, shard_id: int, num_shards: int, seed: int, epoch: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must lie in [0, num_shards), got {shard_id} of {num_shards}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed {seed}, epoch {epoch}")


# -- pipelines -----------------------------------------------------------------------------


def _pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    train: bool,
    batch_size: int,
    augment: Callable,
    *,
    device_id: int | None,
    shard_id: int,
    num_shards: int,
    num_threads: int,
    seed: int,
    epoch: int,
):
    """The built pipeline of one epoch: read (in :func:`epoch_order` when training),
    decode to RGB, then ``augment(images, seeds, fn, types)`` -> float CHW images."""
    dali = _require()
    fn, types = dali.fn, dali.types
    _check(batch_size, shard_id, num_shards, seed, epoch)
    gpu = device_id is not None
    files, labels = list(files), list(labels)
    if train:
        order = epoch_order(len(files), seed, epoch, num_shards)
        files = [files[i] for i in order]
        labels = [labels[i] for i in order]
    if len(files) < num_shards:
        raise ValueError(f"{len(files)} images cannot fill {num_shards} shards")
    seeds = epoch_seeds(seed, epoch, shard_id)

    @dali.pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seeds[0]
    )
    def pipe():
        encoded, label = fn.readers.file(
            files=files,
            labels=labels,
            random_shuffle=False,  # the order is epoch_order's
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=False,
            stick_to_shard=True,
            name="Reader",
        )
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = augment(images, seeds[1:], fn, types)
        if gpu:
            label = label.gpu()
        return images, label

    p = pipe()
    p.build()
    p.ovsw_num_files = len(files)
    return p


def _lighting_mean(fn, types, mean: Sequence[float], alphastd: float, seed: int):
    """Per image ``255 * (mean - eigvec @ (alpha * eigval))``, ``alpha ~ N(0, alphastd)``:
    normalising with it adds :class:`ovsw.train.data.Lighting`'s offset to the [0, 1] image."""
    m = np.asarray(IMAGENET_PCA_EIGVEC, np.float32) * np.asarray(IMAGENET_PCA_EIGVAL, np.float32)
    alpha = fn.random.normal(shape=[1, 3], stddev=float(alphastd), seed=seed)
    offset = fn.reshape(fn.coord_transform(alpha, M=m.ravel().tolist()), shape=[3])
    return 255.0 * (types.Constant(np.asarray(mean, np.float32)) - offset)


def _imagenet_augment(train: bool, crop: int, resize: int, lighting: float):
    if not lighting >= 0:
        raise ValueError(f"lighting (the alpha std) must be >= 0, got {lighting}")
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]

    def augment(images, seeds, fn, types):
        if train:
            images = fn.random_resized_crop(
                images, size=[crop, crop], random_area=TRAIN_SCALE, seed=seeds[0]
            )
            mirror = fn.random.coin_flip(probability=0.5, seed=seeds[1])
            norm_mean = mean
            if lighting:
                norm_mean = _lighting_mean(fn, types, IMAGENET_MEAN, lighting, seeds[2])
        else:
            images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
            mirror, norm_mean = 0, mean
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=(crop, crop),
            mean=norm_mean,
            std=std,
            mirror=mirror,
        )

    return augment


def _cifar_augment(train: bool):
    mean = [255 * m for m in CIFAR_MEAN]
    std = [255 * s for s in CIFAR_STD]
    size, pad = CIFAR_SIZE, CIFAR_PADDING

    def augment(images, seeds, fn, types):
        mirror = 0
        if train:
            # RandomCrop(32, padding=4): the window's corner in the zero-padded image at
            # 0..8 per axis, i.e. -4..4 in the image, zeros where it leaves the image.
            start = fn.random.uniform(
                values=list(range(-pad, pad + 1)), shape=[2], dtype=types.INT32, seed=seeds[0]
            )
            images = fn.slice(
                images,
                start=start,
                shape=[size, size],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
            )
            mirror = fn.random.coin_flip(probability=0.5, seed=seeds[1])
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=(size, size),
            out_of_bounds_policy="pad",
            fill_values=0,
            mean=mean,
            std=std,
            mirror=mirror,
        )

    return augment


def imagenet_pipeline(
    root: str | os.PathLike,
    train: bool,
    batch_size: int,
    *,
    device_id: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    seed: int = 42,
    epoch: int = 0,
    crop: int = 224,
    resize: int = 256,
    lighting: float = LIGHTING_STD,
):
    """A built DALI pipeline of one epoch over the class folders in ``root`` yielding
    ``data`` (float32 NCHW, normalised) and ``label`` (int32, ``ImageFolder``'s class
    indices); reader name ``"Reader"``. Train: :func:`epoch_order`'s order, random
    operators seeded by :func:`epoch_seeds`, PCA lighting noise with alpha std
    ``lighting`` (0 leaves it out)."""
    files, labels = image_files(root)
    return _pipeline(
        files,
        labels,
        train,
        batch_size,
        _imagenet_augment(train, crop, resize, lighting),
        device_id=device_id,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
        epoch=epoch,
    )


def cifar_pipeline(
    root: str | os.PathLike,
    train: bool,
    batch_size: int,
    *,
    device_id: int | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    seed: int = 42,
    epoch: int = 0,
):
    """A built DALI pipeline of one epoch over the class folders of 32x32 images in
    ``root`` (``<data>/cifar10/train`` or ``.../val``) with :func:`ovsw.train.data.cifar`'s
    transforms; outputs and order as :func:`imagenet_pipeline`'s."""
    files, labels = image_files(root)
    return _pipeline(
        files,
        labels,
        train,
        batch_size,
        _cifar_augment(train),
        device_id=device_id,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
        epoch=epoch,
    )


# -- loaders ---------------------------------------------------------------------------------


class DALILoader:
    """Iterate DALI pipelines as ``(images, labels)`` torch batches, one epoch per
    ``iter()``; ``len()`` is the number of batches of this shard's epoch.

    ``build(epoch)`` returns the built pipeline of that epoch (reader named ``"Reader"``).
    ``iter()`` reads epoch :attr:`epoch` and then moves on to the next one, so repeated
    iteration walks epochs 0, 1, 2, ...; :meth:`set_epoch` picks the epoch explicitly
    (``ovsw-train`` calls it every epoch, which makes a resumed run read the batches the
    uninterrupted one did). A pass broken off early leaves nothing behind: the next
    ``iter()`` starts a fresh pipeline."""

    def __init__(
        self,
        build: Callable[[int], object],
        shard_size: int,
        batch_size: int,
        *,
        num_classes: int | None = None,
        epoch: int = 0,
    ) -> None:
        self._build = build
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        epoch = self.epoch
        self.epoch += 1
        it = DALIGenericIterator(
            self._build(epoch),
            ["data", "label"],
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=False,
        )
        for batch in it:
            b = batch[0]
            if len(b["label"]):  # the iterator may close a short shard with an empty batch
                yield b["data"], b["label"].reshape(-1).long()


def _loader(
    make_augment,
    root,
    train,
    batch_size,
    *,
    device,
    shard_id,
    num_shards,
    num_threads,
    seed,
    epoch,
) -> DALILoader:
    _require()
    _check(batch_size, shard_id, num_shards, seed, epoch)
    device = torch.device(device)
    device_id = (device.index or 0) if device.type == "cuda" else None
    files, labels = image_files(root)
    build = functools.partial(
        _pipeline,
        files,
        labels,
        train,
        batch_size,
        make_augment(train),
        device_id=device_id,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
    )
    total = len(files) - len(files) % num_shards if train else len(files)
    # DALI's readers split the files into contiguous shards
    shard = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    return DALILoader(
        lambda e: build(epoch=e),
        shard,
        batch_size,
        num_classes=max(labels) + 1,
        epoch=epoch,
    )


def imagenet_loader(
    root: str | os.PathLike,
    train: bool,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    seed: int = 42,
    epoch: int = 0,
    lighting: float = LIGHTING_STD,
) -> DALILoader:
    """:class:`DALILoader` over ``root`` (class sub-folders of images) with
    :func:`imagenet_pipeline`'s transforms, GPU decoding on ``device`` when it is a CUDA
    device; ``epoch`` is the first epoch ``iter()`` reads."""
    return _loader(
        lambda train: _imagenet_augment(train, 224, 256, lighting),
        root,
        train,
        batch_size,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
        epoch=epoch,
    )


def cifar_loader(
    root: str | os.PathLike,
    train: bool,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    shard_id: int = 0,
    num_shards: int = 1,
    num_threads: int = 2,
    seed: int = 42,
    epoch: int = 0,
) -> DALILoader:
    """:class:`DALILoader` over ``root`` (class sub-folders of 32x32 images) with
    :func:`cifar_pipeline`'s transforms; arguments as :func:`imagenet_loader`'s."""
    return _loader(
        _cifar_augment,
        root,
        train,
        batch_size,
        device=device,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
        epoch=epoch,
    )


# -- CIFAR as image folders ----------------------------------------------------------------


def write_image_folder(
    images: np.ndarray, labels: Sequence[int], classes: Sequence[str], folder: str | os.PathLike
) -> Path:
    """Write uint8 images ``[N, H, W, 3]`` as ``<folder>/<class>/<index>.png`` (lossless;
    ``<index>`` zero-padded, so sorted names keep the images' order). Class folders are
    named ``classes[label]`` when those names sort in label order, else
    ``<label>_<name>`` (zero-padded), so that sorted folder names always give back the
    labels. Refuses a ``folder`` that exists already."""
    from PIL import Image

    images = np.asarray(images)
    labels = [int(v) for v in labels]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if labels and not 0 <= min(labels) <= max(labels) < len(classes):
        raise ValueError(
            f"labels must lie in [0, {len(classes)}), got {min(labels)}..{max(labels)}"
        )
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists already; remove it to write it again")
    names = [str(c) for c in classes]
    if sorted(names) != names or len(set(names)) != len(names):
        width = len(str(len(names) - 1))
        names = [f"{k:0{width}d}_{c}" for k, c in enumerate(names)]
    for name in names:
        (folder / name).mkdir(parents=True)
    width = len(str(max(len(images) - 1, 0)))
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(folder / names[label] / f"{i:0{width}d}.png")
    return folder


def export_cifar(root: str | os.PathLike, num_classes: int = 10, *, download: bool = False) -> Path:
    """Write torchvision's CIFAR-10 (or CIFAR-100) under ``<root>/cifar10`` (``cifar100``)
    as the image folders ``--dali True`` reads: ``train/`` (the training images) and
    ``val/`` (the test images), one sub-folder per class, see
    :func:`write_image_folder`. ``download`` fetches the data set first, as
    ``ovsw-train --download True`` does. Returns ``<root>/cifar10``."""
    from . import data

    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    out = Path(root).expanduser() / f"cifar{num_classes}"
    for side in ("train", "val"):
        if (out / side).exists():
            raise FileExistsError(f"{out / side} exists already; remove it to export again")
    sets = {
        side: data.cifar(side == "train", root, num_classes=num_classes, download=download)
        for side in ("train", "val")
    }
    for side, ds in sets.items():
        write_image_folder(np.asarray(ds.data), ds.targets, ds.classes, out / side)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ovsw.train.dali export-cifar --data DIR --set CIFAR10|CIFAR100
    [--download]``."""
    p = argparse.ArgumentParser(
        prog="python -m ovsw.train.dali", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "export-cifar",
        help="write torchvision's CIFAR as <data>/cifar10/{train,val}/<class>/<index>.png",
    )
    e.add_argument("--data", default="./dataset", help="base folder (as ovsw-train's --data)")
    e.add_argument("--set", default="CIFAR10", choices=("CIFAR10", "CIFAR100"))
    e.add_argument("--download", action="store_true", help="download CIFAR first if missing")
    args = p.parse_args(argv)
    from .data import DataNotFoundError

    try:
        out = export_cifar(args.data, 10 if args.set == "CIFAR10" else 100, download=args.download)
    except (DataNotFoundError, FileExistsError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'train'} and {out / 'val'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
