"""The DALI CIFAR train pipeline against torchvision's ImageFolder, side by side, on the CPU.

    python benchmarks/bench_dali.py [--images 5000] [--batch 256] [--threads 2] [--epochs 3]

Writes ``--images`` random-pixel 32x32 PNGs into 10 class folders (a temporary folder,
with ``ovsw.train.dali.write_image_folder``), then reads whole training epochs of them
both ways, the two taking turns epoch by epoch after one warm-up epoch each:

- DALI: ``ovsw.train.dali.cifar_loader(folder, train=True, ...)`` in CPU mode (no GPU is
  used even where one exists) with ``--threads`` DALI threads: decode, RandomCrop(32,
  padding 4), flip, normalise. A fresh pipeline is built for every epoch, as
  ``ovsw-train --dali True`` builds one; the epoch time includes building it.
- torchvision: ``ImageFolder`` with ``ovsw-train``'s CIFAR train transforms
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a fresh
  ``DataLoader`` per epoch with ``--threads`` worker processes, as ``ovsw-train`` builds
  one (the epoch time includes starting the workers).

Prints images/s of each (median over the timed epochs), their ratio, and the median time
to build one epoch's DALI pipeline alone. The last line is one JSON object with every
figure. Needs ``nvidia-dali`` (``pip install "ovsw[dali]"``) and torchvision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_name


def dali_epoch(folder: Path, batch: int, threads: int, epoch: int) -> int:
    from ovsw.train import dali

    loader = dali.cifar_loader(folder, True, batch, num_threads=threads, seed=0, epoch=epoch)
    return sum(len(y) for _, y in loader)


def torchvision_epoch(folder: Path, batch: int, threads: int, epoch: int) -> int:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from ovsw.train.data import CIFAR_MEAN, CIFAR_STD

    tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    ds = datasets.ImageFolder(str(folder), transform=tf)
    gen = torch.Generator().manual_seed(epoch)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=threads, generator=gen)
    return sum(len(y) for _, y in loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads and DataLoader workers")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per side (default 3)")
    args = ap.parse_args()
    if min(args.images, args.batch, args.threads, args.epochs) < 1:
        ap.error("--images, --batch, --threads and --epochs must be positive")

    from ovsw.train import dali

    if not dali.available():
        raise SystemExit('bench_dali.py: NVIDIA DALI is not installed (pip install "ovsw[dali]")')
    import nvidia.dali

    print(
        f"{cpu_name()}, torch {torch.__version__}, DALI {nvidia.dali.__version__}, "
        f"{args.images} random-pixel 32x32 PNGs, batch {args.batch}, {args.threads} threads",
        flush=True,
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = [i % 10 for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = dali.write_image_folder(
            images, labels, [f"c{k}" for k in range(10)], Path(tmp) / "train"
        )
        sides = {"dali": dali_epoch, "torchvision": torchvision_epoch}
        rates = {name: [] for name in sides}
        for e in range(args.epochs + 1):
            for name, epoch in sides.items():
                t0 = time.perf_counter()
                n = epoch(folder, args.batch, args.threads, e)
                dt = time.perf_counter() - t0
                assert n == args.images, (name, n)
                if e > 0:
                    rates[name].append(n / dt)
        builds = []
        for e in range(args.epochs):
            t0 = time.perf_counter()
            dali.cifar_pipeline(folder, True, args.batch, num_threads=args.threads, epoch=e)
            builds.append(time.perf_counter() - t0)
    dali_rate = statistics.median(rates["dali"])
    tv_rate = statistics.median(rates["torchvision"])
    build_s = statistics.median(builds)
    epochs = {name: ", ".join(f"{r:.0f}" for r in rs) for name, rs in rates.items()}
    print(
        f"DALI (CPU) {dali_rate:.0f} images/s (epochs {epochs['dali']}), torchvision "
        f"ImageFolder {tv_rate:.0f} images/s (epochs {epochs['torchvision']}); ratio "
        f"{dali_rate / tv_rate:.1f}x; building one epoch's DALI pipeline {build_s:.3f} s",
        flush=True,
    )
    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "images": args.images,
                "batch": args.batch,
                "threads": args.threads,
                "dali_images_s": dali_rate,
                "torchvision_images_s": tv_rate,
                "ratio": dali_rate / tv_rate,
                "dali_epochs_images_s": rates["dali"],
                "torchvision_epochs_images_s": rates["torchvision"],
                "dali_pipeline_build_s": build_s,
            }
        )
    )


if __name__ == "__main__":
    main()
