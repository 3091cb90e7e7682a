"""The deploy engine's throughput alone, and converted torchvision models against PyTorch.

    python benchmarks/deploy_scaling.py [--rounds 5] [--no-converted]
    bash benchmarks/deploy_before_after.sh BEFORE_TREE AFTER_TREE [ROUNDS]

Engine images/s with no PyTorch call in between (so no PyTorch worker thread spins on
a core the engine wants), at batches 1, 8 and 64 and threads 1 and 2, for the networks
``python -m ovsw.deploy bench`` measures (ResNet18_1w1a at 224, cResNet20_1w1a and
VGGSmall_1w1a at 32): in each of ``--rounds`` rounds, the best of 3 calls per threads
and batch; the medians over rounds are printed with the ratios issue 22 asks for
(batch 64 over batch 8, 2 threads over 1). Then torchvision's mobilenet_v2 and resnet18
converted by ``ovsw.binarize(num_classes=10, linear=True)``, exported at 64x64 and run at
batch 4, against PyTorch's eval of the same binary model, in alternated blocks of 3
calls. It uses only ``export`` and ``load``, so it runs against any tree of the project
(``PYTHONPATH=TREE/python``), which is what ``deploy_before_after.sh`` does. It needs
two CPUs (the engine refuses more threads than the process may use).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ovsw
import ovsw.deploy
from ovsw.deploy import _bench, export, load

NETWORKS = (("ResNet18_1w1a", 224), ("cResNet20_1w1a", 32), ("VGGSmall_1w1a", 32))


def best_of_3(engine, x: np.ndarray) -> float:
    engine(x)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - t)
    return min(times)


def engine_alone(rounds: int) -> None:
    for arch, size in NETWORKS:
        with tempfile.TemporaryDirectory() as tmp:
            path = export(_bench.calibrated(arch, size), Path(tmp) / "net.ovsw", input_size=size)
            engines = {t: load(path, threads=t) for t in (1, 2)}
        rates: dict[tuple[int, int], list[float]] = {}
        for _ in range(rounds):
            for t, engine in engines.items():
                for b in (1, 8, 64):
                    x = np.random.default_rng(0).standard_normal((b, 3, size, size), np.float32)
                    rates.setdefault((t, b), []).append(b / best_of_3(engine, x))
        r = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"ENGINE {arch}: "
            + " ".join(f"t{t}b{b}={v:.1f}" for (t, b), v in sorted(r.items()))
            + f" | b64/b8 t1 {r[1, 64] / r[1, 8]:.2f} t2 {r[2, 64] / r[2, 8]:.2f}"
            + f" | t2/t1 b1 {r[2, 1] / r[1, 1]:.2f} b8 {r[2, 8] / r[1, 8]:.2f}"
            + f" b64 {r[2, 64] / r[1, 64]:.2f}",
            flush=True,
        )


def converted(name: str) -> torch.nn.Module:
    """The torchvision model binarized, with trained-like BatchNorm statistics (from two
    random batches). Not ``ovsw.deploy._bench.converted``: this script also runs on trees
    older than that function."""
    import torchvision

    torch.manual_seed(0)
    model = ovsw.binarize(getattr(torchvision.models, name)(num_classes=10), linear=True)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 64, 64))
    return model.eval()


def converted_models(rounds: int) -> None:
    for name in ("mobilenet_v2", "resnet18"):
        model = converted(name)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(export(model, Path(tmp) / "net.ovsw", input_size=64)).read_bytes()
        for t in (1, 2):
            torch.set_num_threads(t)
            engine = ovsw.deploy.Engine(data, threads=t)
            x = torch.randn(4, 3, 64, 64)
            xn = x.numpy()
            t_torch, t_engine = [], []
            with torch.no_grad():
                model(x)
                engine(xn)
                for _ in range(rounds):
                    for fn, arg, out in ((model, x, t_torch), (engine, xn, t_engine)):
                        for _ in range(3):
                            a = time.perf_counter()
                            fn(arg)
                            out.append(time.perf_counter() - a)
            mt, me = statistics.median(t_torch) * 1e3, statistics.median(t_engine) * 1e3
            print(
                f"CONVERTED t{t} {name} 64x64 b4: torch-eval {mt:.2f} ms engine {me:.2f} ms "
                f"speedup {mt / me:.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-converted", action="store_true")
    args = parser.parse_args()
    engine_alone(args.rounds)
    if not args.no_converted:
        converted_models(args.rounds)


if __name__ == "__main__":
    main()
