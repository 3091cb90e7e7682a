"""NVIDIA DALI input pipelines for ImageNet-style folders (``ovsw-train --dali True``).

They mirror :func:`ovsw.data.imagenet_transforms`: train reads the folder shuffled,
decodes, takes a random resized crop of 224 with upstream's area range (0.08, 1.25),
flips half the images and normalises; validation resizes the shorter side to 256 and
takes the center 224 crop. (Upstream's PCA lighting noise has no DALI counterpart here;
the DALI train side leaves it out.) Decoding runs on the GPU ("mixed") when a device id
is given and as a CPU-only pipeline (``device_id=None``) otherwise.

DALI is the optional extra ``ovsw[dali]`` (``pip install nvidia-dali-cuda130``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "INSTALL_HINT",
    "available",
    "DALILoader",
    "image_files",
    "imagenet_pipeline",
    "imagenet_loader",
]

INSTALL_HINT = (
    "--dali True needs NVIDIA DALI: pip install 'ovsw[dali]' (or pip install nvidia-dali-cuda130)"
)
TRAIN_SCALE = (0.08, 1.25)
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
    crop: int = 224,
    resize: int = 256,
):
    """A built DALI pipeline over the class folders in ``root`` yielding ``data``
    (float32 NCHW, normalised) and ``label`` (int32, ``ImageFolder``'s class indices);
    reader name ``"Reader"``. Train order: a permutation drawn from ``seed``, then the
    reader's reshuffle after every epoch (each epoch sees every file once)."""
    dali = _require()
    fn, types = dali.fn, dali.types
    gpu = device_id is not None
    mean = [255 * m for m in IMAGENET_MEAN]
    std = [255 * s for s in IMAGENET_STD]

    files, labels_list = image_files(root)
    if not files:
        raise FileNotFoundError(f"no images in class folders under {root}")
    if train:  # the first epoch shuffled too; the reader reshuffles after each epoch
        order = np.random.default_rng(seed).permutation(len(files))
        files = [files[i] for i in order]
        labels_list = [labels_list[i] for i in order]
        # equal shards, so every rank of a distributed run takes the same number of steps
        keep = len(files) - len(files) % num_shards
        files, labels_list = files[:keep], labels_list[:keep]

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed + 7919 * shard_id,  # each rank its own crops and flips
    )
    def pipe():
        jpegs, labels = fn.readers.file(
            files=files,
            labels=labels_list,
            shuffle_after_epoch=train,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=False,
            stick_to_shard=not train,  # validation: each rank keeps its own files
            name="Reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=[crop, crop], random_area=TRAIN_SCALE)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.resize(images, resize_shorter=resize, interp_type=types.INTERP_TRIANGULAR)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=(crop, crop),
            mean=mean,
            std=std,
            mirror=mirror,
        )
        if gpu:
            labels = labels.gpu()
        return images, labels

    p = pipe()
    p.build()
    p.ovsw_num_files = len(files)
    return p


class DALILoader:
    """Iterate a DALI pipeline as ``(images, labels)`` torch batches, one epoch per
    ``iter()``; ``len()`` is the number of batches of this shard's epoch."""

    def __init__(self, pipeline, shard_size: int, batch_size: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.batch_size = batch_size
        self.shard_size = shard_size
        self._it = DALIGenericIterator(
            pipeline,
            ["data", "label"],
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=True,
        )

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self):
        for batch in self._it:
            b = batch[0]
            if len(b["label"]):  # the iterator may close a short shard with an empty batch
                yield b["data"], b["label"].reshape(-1).long()


def image_files(root: str | os.PathLike) -> tuple[list[str], list[int]]:
    """The images under ``root``'s class folders and their labels, in ``ImageFolder``'s
    order (classes and files sorted by name)."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for k, c in enumerate(classes):
        for p in sorted((root / c).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(p))
                labels.append(k)
    return files, labels


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
) -> DALILoader:
    """:class:`DALILoader` over ``root`` (class sub-folders of images), GPU decoding on
    ``device`` when it is a CUDA device."""
    device = torch.device(device)
    device_id = (device.index or 0) if device.type == "cuda" else None
    pipe = imagenet_pipeline(
        root,
        train,
        batch_size,
        device_id=device_id,
        shard_id=shard_id,
        num_shards=num_shards,
        num_threads=num_threads,
        seed=seed,
    )
    total = pipe.ovsw_num_files
    # DALI's readers split the files into contiguous shards
    shard = (shard_id + 1) * total // num_shards - shard_id * total // num_shards
    return DALILoader(pipe, shard, batch_size)
