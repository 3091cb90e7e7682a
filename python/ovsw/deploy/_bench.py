"""``python -m ovsw.deploy bench``: the deploy engine against PyTorch on this machine.

Everything is measured side by side in one run, alternating blocks of three calls per
side (medians reported), with the same thread count
on both sides (``torch.set_num_threads`` and the engine's pool):

- every binary 3x3 conv of ResNet18_1w1a at 224x224, batch 1: the layer's time inside
  the engine (``Engine.profile``: sign packing, XNOR-popcount, scale/BN/residual/
  hardtanh epilogue) against ``torch.nn.functional.conv2d`` in float32 at the same
  shape (the bare convolution, nothing else);
- whole models (ResNet18_1w1a at 224, cResNet20_1w1a and VGGSmall_1w1a at 32, batch 1):
  the engine against the float32 counterpart in PyTorch eval mode (the same
  architecture with ``nn.Conv2d`` in place of every ``OvSWConv2d``), and against the
  ovsw model itself in PyTorch eval mode (binary convs emulated in float);
- throughput in images/s at larger batches (8 and 64 by default), engine against the
  float32 counterpart, for the same models, and how the engine scales: images/s at
  batch 64 over batch 8 at each thread count, and at 2 threads over 1 at each batch;
- the stem's share of each model's engine time at batch 1 (the float ops before the
  first binary conv, as ``python -m ovsw.deploy profile`` reports it);
- torchvision models converted by ``ovsw.binarize(linear=True)`` (MobileNetV2, whose
  depthwise convs take the engine's grouped route, and ResNet-18, both at 64x64, batch
  4): the engine against the same binary model in PyTorch eval mode (skipped, with a
  note, without torchvision);
- file size against the float ``state_dict`` saved by ``torch.save``;
- the largest relative difference between engine and PyTorch logits.

It first reports the machine: the CPU model, the instruction-set flags the kernels use
that this CPU has, the kernels it can run and the one measured (``--kernel``, default
the best).

Models are randomly initialised, with BatchNorm given trained-like statistics (weights
U(0.5, 1.5), biases N(0, 0.1), running statistics from two batches of random images),
so that every layer carries signal and the binary activations are not degenerate.
The last line printed is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _core, models
from ..nn import OvSWConv2d
from . import export, load
from ._profile import median_times, stem

#: Consecutive timed calls per side before switching to the other.
BLOCK = 3
MODELS = (("ResNet18_1w1a", 224), ("cResNet20_1w1a", 32), ("VGGSmall_1w1a", 32))
BATCHES = (1, 8, 64)
#: torchvision models converted by ``ovsw.binarize``: (name, input size, batch).
CONVERTED = (("mobilenet_v2", 64, 4), ("resnet18", 64, 4))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrated(arch: str, size: int, seed: int = 0) -> nn.Module:
    """``arch`` at random init with trained-like BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = models.create(arch)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, size, size))
    return model.eval()


def float_counterpart(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every OvSWConv2d replaced by an nn.Conv2d of the same
    shape and weights (the full-precision network the binary one stands in for)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, OvSWConv2d):
            conv = nn.Conv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                bias=m.bias is not None,
            )
            conv.load_state_dict(
                {k: v for k, v in m.state_dict().items() if k in ("weight", "bias")}
            )
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], conv)
    return model.eval()


def _time(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def _median(xs) -> float:
    return float(statistics.median(xs))


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def bench_layers(engine, threads: int, repeats: int, size: int) -> list[dict]:
    """Binary 3x3 convs of the engine's network at batch 1 vs torch float conv2d."""
    x = np.random.default_rng(1).standard_normal((1, 3, size, size), dtype=np.float32)
    graph = engine.graph
    shapes = {}
    for op in graph:
        if op["op"] == "bconv2d" and op["kernel"] == [3, 3]:
            shapes[op["name"]] = op
    _, profile = engine.profile(x)  # warm-up, and the input shape of each op
    out_shapes = {t.name: t.shape for t in profile}
    in_hw = {}
    prev = {}
    for op in graph:
        prev[op["y"]] = op["name"]
    for name, op in shapes.items():
        src = prev.get(op["x"])
        h = out_shapes[src][2] if src is not None else size
        in_hw[name] = h
    convs = {}
    for name, op in shapes.items():
        key = (op["in_channels"], op["out_channels"], in_hw[name], op["stride"][0])
        convs.setdefault(key, []).append(name)
    torch_inputs = {
        key: (torch.randn(1, key[0], key[2], key[2]), torch.randn(key[1], key[0], 3, 3))
        for key in convs
    }
    eng_t = {name: [] for name in shapes}
    torch_t = {key: [] for key in convs}
    with torch.no_grad():
        for key, (xi, wi) in torch_inputs.items():
            F.conv2d(xi, wi, stride=key[3], padding=1)
        for _ in range(repeats):
            for _ in range(BLOCK):
                _, profile = engine.profile(x)
                for t in profile:
                    if t.name in eng_t:
                        eng_t[t.name].append(t.seconds)
            for key, (xi, wi) in torch_inputs.items():
                for _ in range(BLOCK):
                    torch_t[key].append(_time(F.conv2d, xi, wi, stride=key[3], padding=1))
    rows = []
    for key, names in convs.items():
        e = _median([_median(eng_t[n]) for n in names])
        t = _median(torch_t[key])
        rows.append(
            {
                "threads": threads,
                "shape": f"{key[0]}->{key[1]} {key[2]}x{key[2]} s{key[3]}",
                "layers": len(names),
                "torch_ms": t * 1e3,
                "engine_ms": e * 1e3,
                "speedup": t / e,
            }
        )
    return rows


def bench_models(
    threads: int,
    repeats: int,
    workdir: Path,
    archs=MODELS,
    kernel: str = "auto",
    batches=BATCHES,
    batch_repeats: int = 3,
) -> tuple[list[dict], list[dict]]:
    """Whole models at batch 1 (rows), and throughput at ``batches`` (rows)."""
    rows, throughput = [], []
    for arch, size in archs:
        model = calibrated(arch, size)
        fp = float_counterpart(model)
        path = export(model, workdir / f"{arch}.ovsw", input_size=size)
        engine = load(path, threads=threads, kernel=kernel)
        # Agreement over 16 images (one batch), then timing at batch 1.
        check = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(check).numpy()
        per_sample = np.abs(engine(check.numpy()) - ref).max(1) / np.abs(ref).max(1)
        x = torch.randn(1, 3, size, size)
        xn = x.numpy()
        with torch.no_grad():
            for f, a in ((fp, x), (model, x), (engine, xn)):
                f(a)
            t_fp, t_bin, t_eng = [], [], []
            # Blocks of BLOCK calls per side, alternating: the drift of a shared machine
            # hits both sides alike, and neither pays for the other's idle spinning
            # worker threads (only a block's first call could).
            for _ in range(repeats):
                for f, a, out in ((fp, x, t_fp), (model, x, t_bin), (engine, xn, t_eng)):
                    out.extend(_time(f, a) for _ in range(BLOCK))
        times = median_times(engine, xn, 3)
        stem_s = sum(t.seconds for t in stem(times))
        sd = state_dict_bytes(model)
        rows.append(
            {
                "threads": threads,
                "arch": arch,
                "input": size,
                "torch_fp32_ms": _median(t_fp) * 1e3,
                "torch_ovsw_ms": _median(t_bin) * 1e3,
                "engine_ms": _median(t_eng) * 1e3,
                "speedup": _median(t_fp) / _median(t_eng),
                "speedup_vs_ovsw_eval": _median(t_bin) / _median(t_eng),
                "stem_ms": stem_s * 1e3,
                "stem_share": stem_s / sum(t.seconds for t in times),
                "max_rel_err": float(per_sample.max()),
                "samples_over_1e-4": int((per_sample >= 1e-4).sum()),
                "file_bytes": path.stat().st_size,
                "state_dict_bytes": sd,
                "size_ratio": path.stat().st_size / sd,
                "engine": engine,
            }
        )
        for batch in batches:
            if batch == 1:
                t_torch, t_engine = _median(t_fp), _median(t_eng)
            else:
                t_torch, t_engine = time_batch(fp, engine, batch, size, batch_repeats)
            throughput.append(
                {
                    "threads": threads,
                    "arch": arch,
                    "batch": batch,
                    "torch_images_s": batch / t_torch,
                    "engine_images_s": batch / t_engine,
                    "ratio": t_torch / t_engine,
                }
            )
    return rows, throughput


def converted(name: str, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` (10 classes, random init) through
    ``ovsw.binarize(linear=True)``, BatchNorm given trained-like running statistics, in
    eval mode. Needs torchvision (the ``train`` extra)."""
    import torchvision

    from ..convert import binarize

    torch.manual_seed(seed)
    model = binarize(getattr(torchvision.models, name)(weights=None, num_classes=10), linear=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def bench_converted(
    threads: int, repeats: int, workdir: Path, kernel: str = "auto", models=CONVERTED
) -> list[dict]:
    """Converted torchvision models: the engine against the same binary model in
    PyTorch eval mode, at each model's batch (rows; none without torchvision)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("torchvision is not installed: converted models not measured", flush=True)
        return []
    rows = []
    for name, size, batch in models:
        model = converted(name)
        path = export(model, workdir / f"{name}.ovsw", input_size=size)
        engine = load(path, threads=threads, kernel=kernel)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()  # also the warm-up calls
            per_sample = np.abs(engine(xn) - ref).max(1) / np.abs(ref).max(1)
            t_bin, t_eng = [], []
            for _ in range(repeats):  # alternating blocks, as in bench_models
                for f, a, out in ((model, x, t_bin), (engine, xn, t_eng)):
                    out.extend(_time(f, a) for _ in range(BLOCK))
        _, profile = engine.profile(xn)
        slowest = max(profile, key=lambda t: t.seconds)
        rows.append(
            {
                "threads": threads,
                "model": name,
                "input": size,
                "batch": batch,
                "torch_ovsw_ms": _median(t_bin) * 1e3,
                "engine_ms": _median(t_eng) * 1e3,
                "speedup_vs_ovsw_eval": _median(t_bin) / _median(t_eng),
                "max_rel_err": float(per_sample.max()),
                "slowest_op": f"{slowest.name} ({slowest.op}, {slowest.seconds * 1e3:.2f} ms)",
            }
        )
    return rows


def scaling_rows(batch_rows: list[dict]) -> list[dict]:
    """The engine's images/s at batch 64 over batch 8 (``what`` "b64/b8") at each thread
    count, and at 2 threads over 1 (``"t2/t1"``) at each batch, where both were measured."""
    rate = {(r["arch"], r["threads"], r["batch"]): r["engine_images_s"] for r in batch_rows}
    out = []
    for (arch, threads, batch), v in rate.items():
        if batch == 64 and (arch, threads, 8) in rate:
            out.append(
                {
                    "arch": arch,
                    "threads": threads,
                    "batch": 64,
                    "what": "b64/b8",
                    "ratio": v / rate[(arch, threads, 8)],
                }
            )
        if threads == 2 and (arch, 1, batch) in rate:
            out.append(
                {
                    "arch": arch,
                    "threads": 2,
                    "batch": batch,
                    "what": "t2/t1",
                    "ratio": v / rate[(arch, 1, batch)],
                }
            )
    return sorted(out, key=lambda r: (r["arch"], r["what"], r["threads"], r["batch"]))


def resolve_kernel(name: str) -> str:
    """The kernel ``name`` selects on this CPU (``"auto"``: the best); ValueError naming
    the missing CPU flag for one this CPU cannot run."""
    from .. import _core

    return _core.deploy_kernel(name)


def time_batch(fp: nn.Module, engine, batch: int, size: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of the float model and the engine on one batch, in
    ``repeats`` alternating blocks of :data:`BLOCK` calls per side (after one warm-up
    call each), as for whole models: only a block's first call can pay for the other
    side's worker threads still spinning."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    xn = x.numpy()
    t_fp, t_eng = [], []
    with torch.no_grad():
        fp(x)
        engine(xn)
        for _ in range(repeats):
            t_fp.extend(_time(fp, x) for _ in range(BLOCK))
            t_eng.extend(_time(engine, xn) for _ in range(BLOCK))
    return _median(t_fp), _median(t_eng)


def run(
    threads=(1, 2),
    repeats: int = 10,
    model_repeats: int = 5,
    kernel: str = "auto",
    batches=BATCHES,
    batch_repeats: int = 3,
) -> dict:
    """Runs the whole benchmark, prints the tables and returns the summary dict."""
    from . import cpu_flags, kernels

    available = kernels()
    chosen = resolve_kernel(kernel)
    flags = cpu_flags()
    cpu = cpu_model()
    print(
        f"ovsw deploy benchmark: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}\n"
        f"CPU flags for the kernels: {' '.join(flags) or 'none'}; kernels this CPU runs: "
        f"{', '.join(available)}; measured: {chosen}",
        flush=True,
    )
    torch_threads = torch.get_num_threads()
    layer_rows, model_rows, batch_rows, converted_rows = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        try:
            for t in threads:
                torch.set_num_threads(t)
                mrows, brows = bench_models(
                    t,
                    model_repeats,
                    tmp,
                    kernel=kernel,
                    batches=batches,
                    batch_repeats=batch_repeats,
                )
                resnet = next(r for r in mrows if r["arch"] == "ResNet18_1w1a")
                layer_rows += bench_layers(resnet["engine"], t, repeats, 224)
                for r in mrows:
                    r.pop("engine")
                model_rows += mrows
                batch_rows += brows
                converted_rows += bench_converted(t, model_repeats, tmp, kernel=kernel)
        finally:
            torch.set_num_threads(torch_threads)
    print(
        "\nBinary 3x3 convs of ResNet18_1w1a at 224x224, batch 1 "
        "(torch: float32 F.conv2d of the same shape)"
    )
    print(
        f"{'threads':>7}  {'shape':<22} {'layers':>6} {'torch ms':>9} {'engine ms':>10} "
        f"{'speedup':>8}"
    )
    for r in layer_rows:
        print(
            f"{r['threads']:>7}  {r['shape']:<22} {r['layers']:>6} {r['torch_ms']:>9.3f} "
            f"{r['engine_ms']:>10.3f} {r['speedup']:>7.1f}x"
        )
    print(
        "\nWhole models, batch 1 (torch fp32: the same network with nn.Conv2d; "
        "torch ovsw: the binary model in eval mode)"
    )
    print(
        f"{'threads':>7}  {'model':<16} {'torch fp32 ms':>13} {'torch ovsw ms':>13} "
        f"{'engine ms':>10} {'speedup':>8} {'rel err':>9} {'file':>9} {'state_dict':>10} "
        f"{'size':>6}"
    )
    for r in model_rows:
        print(
            f"{r['threads']:>7}  {r['arch']:<16} {r['torch_fp32_ms']:>13.2f} "
            f"{r['torch_ovsw_ms']:>13.2f} {r['engine_ms']:>10.2f} {r['speedup']:>7.1f}x "
            f"{r['max_rel_err']:>9.1e} {r['file_bytes'] / 2**20:>7.2f}MB "
            f"{r['state_dict_bytes'] / 2**20:>8.2f}MB {r['size_ratio']:>6.3f}"
        )
    print("\nThroughput, images/s (torch: the float32 counterpart in eval mode)")
    print(
        f"{'threads':>7}  {'model':<16} {'batch':>5} {'torch img/s':>12} "
        f"{'engine img/s':>13} {'ratio':>7}"
    )
    for r in batch_rows:
        print(
            f"{r['threads']:>7}  {r['arch']:<16} {r['batch']:>5} {r['torch_images_s']:>12.1f} "
            f"{r['engine_images_s']:>13.1f} {r['ratio']:>6.1f}x"
        )
    scaling = scaling_rows(batch_rows)
    if scaling:
        print("\nScaling of the engine (ratios of images/s)")
        print(f"{'model':<16} {'threads':>7} {'batch':>5}  ratio")
        for r in scaling:
            print(
                f"{r['arch']:<16} {r['threads']:>7} {r['batch']:>5}  {r['what']} {r['ratio']:.2f}"
            )
    print("\nStem share of the engine's time at batch 1 (ops before the first binary conv)")
    for r in model_rows:
        print(
            f"{r['threads']:>7}  {r['arch']:<16} {r['stem_ms']:>8.3f} ms  {r['stem_share']:>6.1%}"
        )
    if converted_rows:
        print(
            "\nConverted torchvision models, ovsw.binarize(linear=True) "
            "(torch ovsw: the same binary model in eval mode)"
        )
        print(
            f"{'threads':>7}  {'model':<13} {'input':>5} {'batch':>5} {'torch ovsw ms':>13} "
            f"{'engine ms':>10} {'speedup':>8} {'rel err':>9}  slowest engine op"
        )
    for r in converted_rows:
        print(
            f"{r['threads']:>7}  {r['model']:<13} {r['input']:>5} {r['batch']:>5} "
            f"{r['torch_ovsw_ms']:>13.2f} {r['engine_ms']:>10.2f} "
            f"{r['speedup_vs_ovsw_eval']:>7.1f}x {r['max_rel_err']:>9.1e}  {r['slowest_op']}"
        )
    speedups = [r["speedup"] for r in layer_rows]
    r18 = [r for r in model_rows if r["arch"] == "ResNet18_1w1a"]
    r18_1 = next((r for r in r18 if r["threads"] == 1), r18[0])
    r18_batches = [r for r in batch_rows if r["arch"] == "ResNet18_1w1a"]
    summary = {
        "binary3x3_speedup_min": round(min(speedups), 2),
        "binary3x3_speedup_median": round(_median(speedups), 2),
        "model_speedup": round(r18_1["speedup"], 2),
        "model_speedup_vs_ovsw_eval": round(r18_1["speedup_vs_ovsw_eval"], 2),
        "max_rel_err": float(f"{max(r['max_rel_err'] for r in model_rows):.3g}"),
        "size_ratio": round(r18_1["size_ratio"], 4),
        "threads": list(threads),
        "kernel": chosen,
        "cpu": cpu,
        "cpu_flags": flags,
        "kernels": available,
        "batches": list(batches),
        "resnet18_throughput_ratio_min": round(min(r["ratio"] for r in r18_batches), 2),
        "throughput_ratio_min": round(min(r["ratio"] for r in batch_rows), 2),
        "scaling": [{**r, "ratio": round(r["ratio"], 2)} for r in scaling],
        "stem_share": [
            {"threads": r["threads"], "arch": r["arch"], "share": round(r["stem_share"], 3)}
            for r in model_rows
        ],
        "throughput": [
            {
                "threads": r["threads"],
                "arch": r["arch"],
                "batch": r["batch"],
                "engine_images_s": round(r["engine_images_s"], 1),
                "torch_images_s": round(r["torch_images_s"], 1),
            }
            for r in batch_rows
        ],
        "converted": [
            {
                "threads": r["threads"],
                "model": r["model"],
                "input": r["input"],
                "batch": r["batch"],
                "engine_ms": round(r["engine_ms"], 2),
                "torch_ovsw_ms": round(r["torch_ovsw_ms"], 2),
                "speedup_vs_ovsw_eval": round(r["speedup_vs_ovsw_eval"], 2),
                "max_rel_err": float(f"{r['max_rel_err']:.3g}"),
            }
            for r in converted_rows
        ],
    }
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ovsw.deploy bench",
        description="Measure the deploy engine against PyTorch on this machine.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="thread counts to measure, each at most the CPUs this process may use "
        "(default: 1 2, or 1 where the process may use one CPU)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed runs per binary conv layer (default 10)"
    )
    parser.add_argument(
        "--model-repeats", type=int, default=5, help="timed runs per whole model (default 5)"
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=list(BATCHES),
        help="batch sizes for the throughput table (default: 1 8 64)",
    )
    parser.add_argument(
        "--batch-repeats",
        type=int,
        default=3,
        help="alternating blocks of 3 timed calls per side per batch size above 1 (default 3)",
    )
    parser.add_argument(
        "--kernel",
        default="auto",
        help="binary-conv kernel to measure: 'auto' (the best this CPU runs) or one of "
        "ovsw.deploy.kernels()",
    )
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = [t for t in (1, 2) if t <= _core.deploy_threads()]
    counts = [*args.threads, *args.batches, args.repeats, args.model_repeats, args.batch_repeats]
    if any(t < 1 for t in counts):
        parser.error(
            "--threads, --batches, --repeats, --model-repeats and --batch-repeats must be positive"
        )
    try:
        for t in args.threads:  # the engine's check, before any measurement
            _core.deploy_threads(t)
        kernel = resolve_kernel(args.kernel)
    except ValueError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    summary = run(
        tuple(args.threads),
        args.repeats,
        args.model_repeats,
        kernel,
        tuple(args.batches),
        args.batch_repeats,
    )
    print(json.dumps(summary))
    return 0
