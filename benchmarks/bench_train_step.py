"""One OvSW training step, ovsw (Rust core) against the plain-PyTorch oracle, side by side.

    python benchmarks/bench_train_step.py [--steps 10] [--threads 2]
    python benchmarks/bench_train_step.py --device cuda [--steps 5]
    python benchmarks/bench_train_step.py --device cuda --dry-run
    python benchmarks/bench_train_step.py --compile [--steps 10] [--threads 2]

On CUDA (issue 11) it times a user's loop with no syncs inside (forward under autocast
for AMP, backward, AGS+SAD, SGD; AMP is float16 with GradScaler, whose own inf check is
the one sync per step, the same for every implementation) for ResNet18_1w1a at batch 256
and 224x224 and cResNet20_1w1a at batch 128, fp32 and AMP, for three implementations in
one process: "oracle" (``ovsw.testing``'s reference, the ops upstream runs), "ovsw" (the package as
users get it: OvSWConv2d and OvSW on the fused CUDA route) and "libtorch" (the same
package with its CUDA kernels turned off, ``ovsw.cuda.disabled()``). Like with like: no
side reads anything back to the host per layer. The oracle's AGS+SAD is
``OracleOvSW(host_figures=False)``: per layer the SPEC formula in torch ops
(``ovsw.testing.ags_sad_layer``, a dozen small kernels) with each layer's two figures
left as 0-dim tensors on the GPU; ovsw runs its two fused launches for all layers
("libtorch": its libtorch ops for all layers) with the figures left in one [L, 2] GPU
tensor. Neither syncs inside ``step()`` (GradScaler's inf check aside, the same for all
three). It checks that "ovsw" ran the kernels (``ovsw.cuda.route_counts()``, no op
declined) and prints the step time, the AGS+SAD time (alone, on real gradients), the
peak memory of a step (torch.cuda max_memory_allocated above what was allocated before
it), ratios to the oracle, and the top kernels of one profiled step. Targets on an
H100/H200: step <= 0.75x the oracle, AGS+SAD <= 0.1x, peak memory <= 0.8x.

``--device cuda --dry-run`` runs that code on the CPU, without a GPU, as a check that it
works (timings meaningless): a tiny model of two binary convs, fp32 only, one step per
round, the "ovsw" side's CPU tensors on
the fused route through the host launcher (``_core.cuda_set_host_launcher(True)``: the
CUDA kernels compiled for the CPU), no peak memory or profile.

With ``--compile`` it measures instead what ``torch.compile`` gains or costs: ovsw in
eager mode against the same model compiled with ``torch.compile(model, fullgraph=True)``
(step eager) and with ``torch.compile(opt.step)`` too, interleaved; it reports each
one's first step (which compiles) and the median step after the warmup, and the ratio
compiled / eager (on the CPU).

Otherwise (on the CPU), for each case, both implementations get the same model (same
weights, the oracle's binary convs swapped in by ``ovsw.testing.to_oracle``) and the same batch. A
step is forward, backward, AGS+SAD, SGD (the oracle reads its figures per layer there, a
plain memory read on the CPU, no sync). Steps of the two are interleaved so that machine
noise hits both alike; the median over steps is reported. Peak memory of a step is
measured in a fresh subprocess per implementation: peak RSS during its first step
(activations, gradients, momentum and SAD buffers) minus RSS just before it.

Targets (issue 2): step-time ratio ovsw/oracle <= 1.0, AGS+SAD-time ratio <= 0.3.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from _common import OVSW_IMAGENET

import ovsw
from ovsw.testing import OracleOvSW, to_oracle

CASES = [
    # (arch, num_classes, batch, resolution)
    ("cResNet20_1w1a", 10, 128, 32),
    ("ResNet18_1w1a", 1000, 8, 224),
]


def build(arch, num_classes, batch, res, impl):
    torch.manual_seed(0)
    model = ovsw.models.create(arch, num_classes=num_classes)
    if impl == "oracle":
        model = to_oracle(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    wrapper = OracleOvSW if impl == "oracle" else ovsw.OvSW
    opt = wrapper(sgd, model, **OVSW_IMAGENET)
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="measure torch.compile (model, and model + step) against eager ovsw",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: run the CUDA benchmark's code on the CPU (host launcher), "
        "one tiny case, to check that it works; the timings mean nothing",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if args.dry_run:
            ovsw._core.cuda_set_host_launcher(True)
            cuda_main(args, device="cpu")
            return
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available")
        cuda_main(args)
        return
    if args.dry_run:
        ap.error("--dry-run goes with --device cuda")

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


# -- CUDA -------------------------------------------------------------------------------
CUDA_CASES = [
    # (arch, num_classes, batch, resolution)
    ("ResNet18_1w1a", 1000, 256, 224),
    ("cResNet20_1w1a", 10, 128, 32),
]
DRY_RUN_CASES = [("tiny", 10, 2, 8)]
IMPLS = ("oracle", "ovsw", "libtorch")


def tiny_model(num_classes):
    """Two binary convs of 8 channels between a float stem and head (the dry run's)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        ovsw.OvSWConv2d(8, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        ovsw.OvSWConv2d(8, 8, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, num_classes),
    )


def build_cuda(arch, num_classes, batch, res, impl, device="cuda"):
    torch.manual_seed(0)
    if arch == "tiny":
        model = tiny_model(num_classes)
    else:
        model = ovsw.models.create(arch, num_classes=num_classes)
    sgd_params = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
    if impl == "oracle":
        # The SPEC formula in torch ops, each layer's figures left on the device.
        model = to_oracle(model).to(device).train()
        sgd = torch.optim.SGD(model.parameters(), **sgd_params)
        opt = OracleOvSW(sgd, model, host_figures=False, **OVSW_IMAGENET)
    else:
        model = model.to(device).train()
        sgd = torch.optim.SGD(model.parameters(), **sgd_params)
        opt = ovsw.OvSW(sgd, model, **OVSW_IMAGENET)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return model, opt, x, y


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# (fused, declined) of each op with a fused form, over the "ovsw" runs only.
OVSW_ROUTES: dict[str, list[int]] = {}
OVSW_DECLINED: dict[str, str] = {}


@contextlib.contextmanager
def route(impl):
    """The context an implementation's steps run in: the library with its CUDA kernels
    turned off for "libtorch"; for "ovsw", the routes its ops took are tallied."""
    import ovsw.cuda

    if impl == "libtorch":
        with ovsw.cuda.disabled():
            yield
        return
    before = ovsw.cuda.route_counts()
    yield
    if impl == "ovsw":
        counts = ovsw.cuda.route_counts()
        for op, (fused, declined) in ovsw.cuda.route_delta(before).items():
            tally = OVSW_ROUTES.setdefault(op, [0, 0])
            tally[0] += fused
            tally[1] += declined
            if declined:
                OVSW_DECLINED[op] = counts[op]["last_declined"]


def check_fused() -> str:
    """What "ovsw" ran: every op with a fused form, always on the fused route."""
    if OVSW_DECLINED or any(f == 0 for f, _ in OVSW_ROUTES.values()):
        raise SystemExit(f"ovsw did not take the fused CUDA route: {OVSW_ROUTES} {OVSW_DECLINED}")
    return ", ".join(f"{op} {f}" for op, (f, _) in OVSW_ROUTES.items())


def cuda_step(model, opt, scaler, x, y, amp):
    with torch.autocast(x.device.type, dtype=torch.float16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()


def cuda_times(runs, amp, steps, rounds, warmup, device="cuda"):
    """Median over rounds of the mean step time of `steps` back-to-back steps, the
    implementations taking turns round by round."""
    times = {impl: [] for impl in runs}
    for r in range(rounds + 1):
        for impl, (model, opt, x, y, scaler) in runs.items():
            with route(impl):
                n = warmup if r == 0 else steps
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    cuda_step(model, opt, scaler, x, y, amp)
                sync(device)
                if r > 0:
                    times[impl].append((time.perf_counter() - t0) / n)
    return {impl: statistics.median(t) for impl, t in times.items()}


def ags_sad_time(model, opt, x, y, amp, impl, reps=20):
    """Seconds per AGS+SAD call on the gradients of one real backward, as ``step()``
    runs it, no side reading anything back to the host: for ovsw ``OvSW._apply`` (the
    figures stay on the device; the public ``apply_ags_sad`` also reads them), for the
    oracle ``OracleOvSW(host_figures=False).apply_ags_sad`` (each layer's figures stay
    on the device too)."""
    apply = opt.apply_ags_sad if impl == "oracle" else opt._apply
    device = x.device.type
    with route(impl):
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        apply()  # warm-up (compiles the kernels on first use)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            apply()
        sync(device)
    return (time.perf_counter() - t0) / reps


def peak_memory(model, opt, x, y, scaler, amp, impl):
    with route(impl):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        cuda_step(model, opt, scaler, x, y, amp)
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def top_kernels(model, opt, x, y, scaler, amp, impl, rows=10):
    from torch.profiler import ProfilerActivity, profile

    with route(impl):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            cuda_step(model, opt, scaler, x, y, amp)
            torch.cuda.synchronize()
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return events.table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return events.table(row_limit=rows)


def cuda_main(args, device: str = "cuda") -> None:
    """The CUDA benchmark; ``device="cpu"`` is ``--dry-run`` (host launcher selected)."""
    dry = device != "cuda"
    name = "CPU, dry run (host launcher)" if dry else torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, ovsw {ovsw.__version__}, {name}")
    steps, warmup, rounds, reps = (1, 1, 1, 1) if dry else (args.steps, args.warmup, 2, 20)
    results = {}
    for case in DRY_RUN_CASES if dry else CUDA_CASES:
        arch, _, batch, res = case
        for amp in (False,) if dry else (False, True):
            runs = {}
            for impl in IMPLS:
                model, opt, x, y = build_cuda(*case, impl, device=device)
                runs[impl] = (model, opt, x, y, torch.amp.GradScaler(device, enabled=amp))
            med = cuda_times(runs, amp, steps, rounds=rounds, warmup=warmup, device=device)
            ags = {i: ags_sad_time(*runs[i][:4], amp, i, reps=reps) for i in IMPLS}
            if dry:
                mem = dict.fromkeys(IMPLS, float("nan"))
            else:
                mem = {i: peak_memory(*runs[i], amp, i) for i in IMPLS}
            key = f"{arch}_b{batch}_{res}_{'amp' if amp else 'fp32'}"
            r = {f"{i}_step_ms": med[i] * 1e3 for i in IMPLS}
            r.update({f"{i}_ags_sad_ms": ags[i] * 1e3 for i in IMPLS})
            r.update({f"{i}_peak_mib": mem[i] / 2**20 for i in IMPLS})
            for i in ("ovsw", "libtorch"):
                r[f"{i}_step_ratio"] = med[i] / med["oracle"]
                r[f"{i}_ags_sad_ratio"] = ags[i] / ags["oracle"]
                r[f"{i}_peak_ratio"] = mem[i] / max(mem["oracle"], 1)
            results[key] = r
            print(f"{key}:", flush=True)
            for i in IMPLS:
                line = (
                    f"  {i:8s} step {r[f'{i}_step_ms']:8.2f} ms  AGS+SAD "
                    f"{r[f'{i}_ags_sad_ms']:7.3f} ms  peak {r[f'{i}_peak_mib']:8.0f} MiB"
                )
                if i != "oracle":
                    line += (
                        f"  ratios: step {r[f'{i}_step_ratio']:.3f} AGS+SAD "
                        f"{r[f'{i}_ags_sad_ratio']:.3f} peak {r[f'{i}_peak_ratio']:.3f}"
                    )
                print(line, flush=True)
            if not dry and arch == CUDA_CASES[0][0]:
                for i in ("ovsw", "oracle"):
                    print(f"  top kernels of one {i} step ({'AMP' if amp else 'fp32'}):")
                    print(top_kernels(*runs[i], amp, i), flush=True)
            del runs
            if not dry:
                torch.cuda.empty_cache()
    print(f"ovsw ran on the fused CUDA route: {check_fused()}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
