"""Fixed costs the README quotes, each measured side by side with what it is compared to.

    python benchmarks/bench_overheads.py [--threads 1] [--steps 20] [--calls 20] [--rounds 101]

1. The flip monitor: cResNet20_1w1a at batch 128, 32x32, trained with OvSW (AGS and SAD
   on, as ``ovsw-train`` runs it); each training step (forward, backward, ``opt.step()``)
   is followed by ``FlipMonitor.update()``. Median milliseconds of each over the steps,
   and the monitor's share of the step.
2. One binary conv call at a tiny size (batch 1, 4 -> 4 channels, 3x3, padding 1, 4x4
   input, training mode, no autograd): the custom op ``torch.ops.ovsw.binary_conv2d``,
   the Rust binding it wraps (``ovsw._core.binary_conv2d_forward``) and the plain torch
   op ``F.conv2d`` on the same tensors. Median microseconds per call; the op's cost above
   the binding (the ``torch.library`` dispatch) and the ratios to ``F.conv2d``.
3. AGS+SAD over cResNet20_1w1a's binary convs, on the gradients of one real backward:
   ``torch.ops.ovsw.ags_sad_step`` against ``ovsw._core.ags_sad_step`` called directly
   (each on its own copy of the gradients and SAD buffers). Median microseconds per call.

Timed calls alternate between the sides block by block, so that a shared machine's
drift hits both alike; the blocks are short and many, so that their median is a block
no other process interrupted. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from _common import OVSW_IMAGENET, cpu_name

import ovsw
from ovsw import _core
from ovsw.analysis import FlipMonitor


def median_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def flip_monitor(steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = ovsw.models.create("cResNet20_1w1a", num_classes=10).train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = ovsw.OvSW(sgd, model, **OVSW_IMAGENET)
    monitor = FlipMonitor(model, opt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    step_s, update_s = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        t1 = time.perf_counter()
        monitor.update()
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
            update_s.append(t2 - t1)
    monitor.total()  # the figures are real (and read once, outside the timing)
    step, update = median_ms(step_s), median_ms(update_s)
    return {
        "binary_weights": sum(monitor.numels),
        "step_ms": step,
        "monitor_update_ms": update,
        "monitor_share_of_step": update / step,
    }


def interleaved_us(calls: dict, block: int, rounds: int) -> dict:
    """Median over rounds of the mean microseconds per call in a block of ``block``
    calls, the sides taking turns block by block (after one warm-up block each)."""
    times = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            dt = (time.perf_counter() - t0) / block
            if r > 0:
                times[name].append(dt)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def binary_conv_call(block: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 4, 4, generator=g)
    w = torch.randn(4, 4, 3, 3, generator=g)
    args = ("ste", [1, 1], [1, 1], [1, 1], 1, True)
    op = torch.ops.ovsw.binary_conv2d
    calls = {
        "op": lambda: op(x, w, None, None, *args, None),
        "binding": lambda: _core.binary_conv2d_forward(x, w, None, None, *args),
        "conv2d": lambda: F.conv2d(x, w, padding=1),
    }
    # the op and the binding it wraps compute the same outputs: check before timing
    assert torch.equal(calls["op"]()[0], calls["binding"]()[0])
    us = interleaved_us(calls, block, rounds)
    return {
        "op_us": us["op"],
        "binding_us": us["binding"],
        "conv2d_us": us["conv2d"],
        "op_minus_binding_us": us["op"] - us["binding"],
        "op_over_conv2d": us["op"] / us["conv2d"],
        "binding_over_conv2d": us["binding"] / us["conv2d"],
    }


def ags_sad_call(block: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = ovsw.models.create("cResNet20_1w1a", num_classes=10).train()
    opt = ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, **OVSW_IMAGENET)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    F.cross_entropy(model(x), torch.arange(32) % 10).backward()
    opt.apply_ags_sad()  # sets up the SAD buffers
    layers = ovsw.binary_layers(model)
    weights = [m.weight.detach() for _, m in layers]

    def copies():
        return (
            [m.weight.grad.clone() for _, m in layers],
            [m.tracker.clone() for _, m in layers],
            [m.weight_prev.clone() for _, m in layers],
        )

    (g1, t1, p1), (g2, t2, p2) = copies(), copies()
    config = _core.OvSWConfig(**OVSW_IMAGENET)
    opts = tuple(OVSW_IMAGENET.values())
    op = torch.ops.ovsw.ags_sad_step
    calls = {
        "op": lambda: op(g1, weights, t1, p1, *opts),
        "binding": lambda: _core.ags_sad_step(config, g2, weights, t2, p2),
    }
    us = interleaved_us(calls, block, rounds)
    return {
        "layers": len(layers),
        "op_us": us["op"],
        "binding_us": us["binding"],
        "op_minus_binding_us": us["op"] - us["binding"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (default 20)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20, help="calls per timed block (default 20)")
    ap.add_argument("--rounds", type=int, default=101, help="timed blocks per side (default 101)")
    args = ap.parse_args()
    if min(args.threads, args.steps, args.calls, args.rounds) < 1 or args.warmup < 0:
        ap.error("--threads, --steps, --calls and --rounds must be positive")
    torch.set_num_threads(args.threads)
    print(
        f"{cpu_name()}, torch {torch.__version__}, ovsw {ovsw.__version__}, {args.threads} threads",
        flush=True,
    )
    mon = flip_monitor(args.steps, args.warmup)
    print(
        f"flip monitor, cResNet20_1w1a ({mon['binary_weights']} binary weights), batch 128: "
        f"update {mon['monitor_update_ms']:.3f} ms per step, training step "
        f"{mon['step_ms']:.1f} ms ({100 * mon['monitor_share_of_step']:.2f}% of the step)",
        flush=True,
    )
    conv = binary_conv_call(args.calls, args.rounds)
    print(
        f"binary conv call, 1x4x4x4 input, 4x4x3x3 weight: torch.ops.ovsw.binary_conv2d "
        f"{conv['op_us']:.1f} us, ovsw._core binding {conv['binding_us']:.1f} us (op - "
        f"binding {conv['op_minus_binding_us']:.1f} us), F.conv2d {conv['conv2d_us']:.1f} us; "
        f"op / F.conv2d {conv['op_over_conv2d']:.1f}x, binding / F.conv2d "
        f"{conv['binding_over_conv2d']:.1f}x",
        flush=True,
    )
    ags = ags_sad_call(args.calls, args.rounds)
    print(
        f"AGS+SAD call, cResNet20_1w1a ({ags['layers']} binary convs): "
        f"torch.ops.ovsw.ags_sad_step {ags['op_us']:.1f} us, ovsw._core binding "
        f"{ags['binding_us']:.1f} us (op - binding {ags['op_minus_binding_us']:.1f} us)",
        flush=True,
    )
    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "torch": torch.__version__,
                "threads": args.threads,
                "flip_monitor": mon,
                "binary_conv_call": conv,
                "ags_sad_call": ags,
            }
        )
    )


if __name__ == "__main__":
    main()
