"""How often the deploy engine's logits differ from ``model.eval()``'s, by network.

    python benchmarks/deploy_agreement.py [--threads 2] [--seed 0]

Binary sums are integers, so only float rounding separates the engine from PyTorch; but
a value that rounding leaves next to zero can binarize to +1 on one side and -1 on the
other, and a deep network turns that one flip into different logits. This counts the
random images (standard normal, one generator seeded ``--seed``, batches of 16) whose
logits differ by a relative 1e-4 or more (largest |engine - torch| of the image over its
largest |torch| logit: the bound ``tests/deploy/test_deploy.py`` holds each image to), for each
network at random init with trained-like BatchNorm statistics
(``ovsw.deploy._bench.calibrated``, as the tests and ``python -m ovsw.deploy bench``
build them). The last line printed is one JSON object with every count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import cpu_name

from ovsw import _core, deploy
from ovsw.deploy._bench import calibrated

#: (arch, input size, images)
CASES = [
    ("cResNet20_1w1a", 32, 512),
    ("cResNet18_1w1a", 32, 512),
    ("VGGSmall_1w1a", 32, 256),
    ("ResNet18_1w1a", 64, 128),
    ("ResNet18_1w1a", 224, 48),
]
REL = 1e-4
BATCH = 16


def count(arch: str, size: int, images: int, threads: int, seed: int, tmp: Path) -> dict:
    model = calibrated(arch, size)
    path = deploy.export(model, tmp / f"{arch}_{size}.ovsw", input_size=size)
    engine = deploy.load(path, threads=threads)
    gen = torch.Generator().manual_seed(seed)
    errs = []
    for start in range(0, images, BATCH):
        x = torch.randn(min(BATCH, images - start), 3, size, size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        y = engine(x.numpy())
        errs.append(np.abs(y - ref).max(1) / np.abs(ref).max(1))
    per_image = np.concatenate(errs)
    agreeing = per_image[per_image < REL]
    return {
        "arch": arch,
        "size": size,
        "images": images,
        "differing": int((per_image >= REL).sum()),
        "max_rel_err_agreeing": float(agreeing.max()) if agreeing.size else None,
        "kernel": engine.kernel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = _core.deploy_threads()
    ap.add_argument(
        "--threads",
        type=int,
        default=min(2, cpus),
        help=f"engine and torch threads (default 2, at most the {cpus} CPUs this process may use)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads < 1:
        ap.error("--threads must be positive")
    try:
        _core.deploy_threads(args.threads)  # the engine's check, before any work
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size, images in CASES:
            r = count(arch, size, images, args.threads, args.seed, Path(tmp))
            rows.append(r)
            rest = r["max_rel_err_agreeing"]
            print(
                f"{arch} at {size}x{size} ({r['kernel']}): {r['differing']} of {images} "
                f"images differ by relative {REL:g} or more"
                + ("" if rest is None else f"; the others within {rest:.1e}"),
                flush=True,
            )
    print(json.dumps({"cpu": cpu_name(), "threads": args.threads, "seed": args.seed, "rows": rows}))


if __name__ == "__main__":
    main()
