"""One OvSW training step, ovsw (Rust core) against the plain-PyTorch oracle, side by side.

    python benchmarks/bench_train_step.py [--steps 10] [--threads 2]
    python benchmarks/bench_train_step.py --compile [--steps 10] [--threads 2]

With ``--compile`` it measures instead what ``torch.compile`` gains or costs: ovsw in
eager mode against the same model compiled with ``torch.compile(model, fullgraph=True)``
(step eager) and with ``torch.compile(opt.step)`` too, interleaved; it reports each
one's first step (which compiles) and the median step after the warmup, and the ratio
compiled / eager.

For each case, both implementations get the same model (same weights, the oracle's
binary convs swapped in by tests/oracle.py) and the same batch. A step is forward,
backward, AGS+SAD, SGD. Steps of the two are interleaved so that machine noise hits both
alike; the median over steps is reported. Peak memory of a step is measured in a fresh
subprocess per implementation: peak RSS during its first step (activations, gradients,
momentum and SAD buffers) minus RSS just before it.

Targets (issue 2): step-time ratio ovsw/oracle <= 1.0, AGS+SAD-time ratio <= 0.3.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ovsw  # noqa: E402
from oracle import OracleOvSW, to_oracle  # noqa: E402

CASES = [
    # (arch, num_classes, batch, resolution)
    ("cResNet20_1w1a", 10, 128, 32),
    ("ResNet18_1w1a", 1000, 8, 224),
]
OVSW_ARGS = dict(
    enable_ags=True,
    delta=0.01,
    enable_dampen=True,
    dampen_weight=2e-5,
    track_momentum=0.999,
    track_threshold=1e-4,
)


def build(arch, num_classes, batch, res, impl):
    torch.manual_seed(0)
    model = ovsw.models.create(arch, num_classes=num_classes)
    if impl == "oracle":
        model = to_oracle(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    wrapper = OracleOvSW if impl == "oracle" else ovsw.OvSW
    opt = wrapper(sgd, model, **OVSW_ARGS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return model.train(), opt, x, y


def timed_step(model, opt, x, y):
    """(step seconds, AGS+SAD seconds) of one full training step."""
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    t1 = time.perf_counter()
    opt.apply_ags_sad()
    t2 = time.perf_counter()
    opt.optimizer.step()
    t3 = time.perf_counter()
    return t3 - t0, t2 - t1


def build_compile(arch, num_classes, batch, res, impl):
    """ovsw eager ("eager"), model compiled ("compiled"), model and step compiled
    ("compiled_step"): (forward, opt, step, x, y)."""
    model, opt, x, y = build(arch, num_classes, batch, res, "ovsw")
    forward = model if impl == "eager" else torch.compile(model, fullgraph=True)
    step = torch.compile(opt.step) if impl == "compiled_step" else opt.step
    return forward, opt, step, x, y


def plain_step(forward, opt, step, x, y) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(forward(x), y)
    opt.zero_grad()
    loss.backward()
    step()
    return time.perf_counter() - t0


def run_compile(args) -> None:
    results = {}
    impls = ("eager", "compiled", "compiled_step")
    for case in CASES:
        arch, _, batch, res = case
        runs = {impl: build_compile(*case, impl) for impl in impls}
        first = {impl: plain_step(*run) for impl, run in runs.items()}
        times = {impl: [] for impl in impls}
        for i in range(args.warmup + args.steps):
            for impl, run in runs.items():
                t = plain_step(*run)
                if i >= args.warmup:
                    times[impl].append(t)
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        key = f"{arch}_b{batch}_{res}"
        r = {f"{impl}_first_step_s": first[impl] for impl in impls}
        r.update({f"{impl}_step_ms": med[impl] * 1e3 for impl in impls})
        r["compiled_ratio"] = med["compiled"] / med["eager"]
        r["compiled_step_ratio"] = med["compiled_step"] / med["eager"]
        results[key] = r
        print(
            f"{key:28s} step eager {r['eager_step_ms']:8.1f} ms, compiled "
            f"{r['compiled_step_ms']:8.1f} ms (ratio {r['compiled_ratio']:.3f}), compiled "
            f"+ step {r['compiled_step_step_ms']:8.1f} ms (ratio "
            f"{r['compiled_step_ratio']:.3f}); first step eager "
            f"{r['eager_first_step_s']:.1f} s, compiled {r['compiled_first_step_s']:.1f} s, "
            f"compiled + step {r['compiled_step_first_step_s']:.1f} s",
            flush=True,
        )
    print(json.dumps(results))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """VmHWM: this process image's peak RSS (unlike ru_maxrss, it does not inherit the
    forking parent's size across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_memory_worker(args, queue):
    arch, num_classes, batch, res, impl, threads = args
    torch.set_num_threads(threads)
    model, opt, x, y = build(arch, num_classes, batch, res, impl)
    before = rss_bytes()
    timed_step(model, opt, x, y)
    queue.put(max(peak_rss_bytes() - before, 0))


def peak_step_memory(case, impl, threads) -> int:
    # Every tensor-sized block through mmap, so a free returns memory at once and RSS
    # tracks live tensors (glibc's default keeps freed heap memory mapped).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_memory_worker, args=((*case, impl, threads), queue))
    p.start()
    value = queue.get()
    p.join()
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--compile",
        action="store_true",
        help="measure torch.compile (model, and model + step) against eager ovsw",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, ovsw {ovsw.__version__}, {args.threads} threads, CPU")
    if args.compile:
        run_compile(args)
        return
    results = {}
    for case in CASES:
        arch, _, batch, res = case
        runs = {impl: build(*case, impl) for impl in ("ovsw", "oracle")}
        times = {impl: [] for impl in runs}
        for i in range(args.warmup + args.steps):
            for impl, (model, opt, x, y) in runs.items():
                step, ags_sad = timed_step(model, opt, x, y)
                if i >= args.warmup:
                    times[impl].append((step, ags_sad))
        med = {
            impl: (
                statistics.median(t[0] for t in ts),
                statistics.median(t[1] for t in ts),
            )
            for impl, ts in times.items()
        }
        mem = {impl: peak_step_memory(case, impl, args.threads) for impl in runs}
        key = f"{arch}_b{batch}_{res}"
        r = {
            "ovsw_step_ms": med["ovsw"][0] * 1e3,
            "oracle_step_ms": med["oracle"][0] * 1e3,
            "step_ratio": med["ovsw"][0] / med["oracle"][0],
            "ovsw_ags_sad_ms": med["ovsw"][1] * 1e3,
            "oracle_ags_sad_ms": med["oracle"][1] * 1e3,
            "ags_sad_ratio": med["ovsw"][1] / med["oracle"][1],
            "ovsw_peak_step_mib": mem["ovsw"] / 2**20,
            "oracle_peak_step_mib": mem["oracle"] / 2**20,
        }
        results[key] = r
        print(
            f"{key:28s} step {r['ovsw_step_ms']:8.1f} ms vs {r['oracle_step_ms']:8.1f} ms "
            f"(ratio {r['step_ratio']:.3f})  AGS+SAD {r['ovsw_ags_sad_ms']:6.2f} ms vs "
            f"{r['oracle_ags_sad_ms']:6.2f} ms (ratio {r['ags_sad_ratio']:.3f})  "
            f"peak step memory {r['ovsw_peak_step_mib']:.0f} MiB vs "
            f"{r['oracle_peak_step_mib']:.0f} MiB",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
