"""The fused CUDA kernels of the Rust core, and their check.

The kernels (binary conv glue and AGS+SAD, CUDA C in ``src/cuda/kernels/``) are
compiled at run time by NVRTC, which the torch CUDA wheel ships, for the GPU present.
:class:`~ovsw.OvSWConv2d` and :class:`~ovsw.OvSW` use them on float32, float16 and
bfloat16 CUDA tensors by themselves; where they do not apply (another dtype or layout,
:func:`set_enabled` ``(False)``, ``OVSW_CUDA_KERNELS=0``) the libtorch route runs, and
where NVRTC or the driver cannot be loaded it runs after one ``RuntimeWarning``.
:func:`route_counts` says which route the ops took.

    python -m ovsw.cuda check [--arch 80 --arch 90]

compiles every kernel for each architecture (no GPU needed) and reports each entry
point with what ptxas says it uses (registers per thread, static shared memory, spill
stores and loads; any spill is a failure); on a machine with a GPU it also runs every
kernel on random inputs in float32, float16 and bfloat16 and prints the maximum errors:
the passes against the reference formulas of :mod:`ovsw.testing` run by libtorch in the
kernels' dtype, the conv against the libtorch path, the AGS+SAD figures against
:mod:`ovsw.testing`'s float64 reference (:func:`ags_sad_reference`) within bounds
derived from the formats' rounding. It exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch

from . import _core
from . import testing as _testing

__all__ = [
    "status",
    "enabled",
    "set_enabled",
    "disabled",
    "route_counts",
    "compile_kernels",
    "parse_ptxas_log",
    "spills",
    "ags_sad_reference",
    "compare_ags_sad_figures",
    "compare_ags_sad",
    "compare_on_gpu",
    "main",
]

ARCHS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest error, relative to the reference's largest magnitude, that counts as a match.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def status() -> dict[str, Any]:
    """Where NVRTC and the CUDA driver were found (or why not), and :func:`enabled`."""
    return _core.cuda_status()


def enabled() -> bool:
    """Whether the CUDA kernels may run (``OVSW_CUDA_KERNELS=0`` turns them off)."""
    return _core.cuda_enabled()


def set_enabled(on: bool) -> None:
    """Turn the CUDA kernels on or off for this process (off: the libtorch path)."""
    _core.cuda_set_enabled(bool(on))


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the library's ops take the libtorch route (the kernels off)."""
    was = enabled()
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(was)


def route_counts() -> dict[str, dict[str, Any]]:
    """How often each of the library's ops with a fused form (``conv_forward``,
    ``conv_backward``, ``ags_sad_step``) ran the CUDA kernels, and how often they
    declined it (the op then ran the libtorch route) in this process:
    ``{op: {"fused": n, "declined": n, "last_declined": reason or None}}``. CPU ops
    count in neither."""
    return _core.cuda_route_counts()


def route_delta(before: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """``(fused, declined)`` per op since ``before`` (a :func:`route_counts`)."""
    now = route_counts()
    return {
        op: (c["fused"] - before[op]["fused"], c["declined"] - before[op]["declined"])
        for op, c in now.items()
    }


def compile_kernels(arch: int) -> dict[str, Any]:
    """Compile every kernel for ``sm_{arch}`` with NVRTC (no GPU needed).

    Returns ``{"arch", "seconds", "ptx", "cubin", "log", "entries", "resources"}`` where
    ``entries`` maps each kernel name to whether both the PTX and the cubin hold it,
    ``resources`` is ptxas's report per kernel (:func:`parse_ptxas_log`) and ``log`` is
    what else NVRTC said (warnings; usually empty).
    """
    t0 = time.perf_counter()
    ptx, cubin, log, declared = _core.cuda_compile(arch)
    seconds = time.perf_counter() - t0
    entries = {
        name: name in declared and name.encode() in cubin for name in _core.cuda_entry_points()
    }
    resources, rest = parse_ptxas_log(log)
    return {
        "arch": arch,
        "seconds": seconds,
        "ptx": ptx,
        "cubin": cubin,
        "log": rest,
        "entries": entries,
        "resources": resources,
    }


# ptxas -v, as NVRTC passes it on (`--ptxas-options=-v`) in the program log:
#   ptxas info    : Compiling entry function 'NAME' for 'sm_90'
#   ptxas info    : Function properties for NAME
#   ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 46 registers, used 1 barriers, 64 bytes smem, 360 bytes cmem[0]
_REPORT = re.compile(r"ptxas\s+(info\s*:|\.)")  # the report's lines, not its warnings
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> tuple[dict[str, dict[str, int]], str]:
    """Split an NVRTC program log into ptxas's verbose report and the rest.

    Returns ``(resources, rest)``: ``resources`` maps each entry function ptxas compiled
    to ``{"registers", "shared", "stack", "spill_stores", "spill_loads"}`` (registers per
    thread; static shared memory, stack frame and spills in bytes; the spills of device
    functions it calls that ptxas reports apart are added to the entry's: to that of the
    entry ptxas was compiling last, as NVRTC 13.0 orders its report; a function reported
    before any entry is not counted), and ``rest`` holds the log's other lines (NVRTC's
    warnings). An entry whose report lacks a figure
    gets -1 for it. ptxas's warnings and errors (``ptxas warning : ...``) stay in
    ``rest``.
    """
    resources: dict[str, dict[str, int]] = {}
    rest: list[str] = []
    entry: str | None = None  # the entry function being compiled
    props: str | None = None  # the function the next "stack frame" line is about
    for line in log.splitlines():
        if not _REPORT.match(line):  # NVRTC's lines, and ptxas's warnings and errors
            if line.strip():
                rest.append(line)
            continue
        if m := _ENTRY.search(line):
            entry = m.group(1)
            resources[entry] = dict.fromkeys(
                ("registers", "shared", "stack", "spill_stores", "spill_loads"), -1
            )
            resources[entry]["shared"] = 0  # ptxas leaves out "0 bytes smem"
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and entry is not None:
            stack, stores, loads = (int(v) for v in m.groups())
            r = resources[entry]
            if props == entry:
                r["stack"] = stack
            # The entry's own spills and those of a callee compiled apart add up,
            # whichever ptxas reports first.
            r["spill_stores"] = max(r["spill_stores"], 0) + stores
            r["spill_loads"] = max(r["spill_loads"], 0) + loads
        elif (m := _USED.search(line)) and entry is not None:
            resources[entry]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                resources[entry]["shared"] = int(s.group(1))
    return resources, "\n".join(rest)


def spills(resources: dict[str, dict[str, int]]) -> list[str]:
    """The kernels of a :func:`parse_ptxas_log` report that spill (any spill store or
    load) or whose report misses a figure, each as ``"NAME: why"``."""
    bad = []
    for name, r in resources.items():
        missing = [k for k, v in r.items() if v < 0]
        if missing:
            bad.append(f"{name}: ptxas reported no {', '.join(missing)}")
        elif r["spill_stores"] or r["spill_loads"]:
            bad.append(
                f"{name}: {r['spill_stores']} bytes spill stores, "
                f"{r['spill_loads']} bytes spill loads"
            )
    return bad


# ---------------------------------------------------------------------------------------
# On a GPU: every kernel against the libtorch path
# ---------------------------------------------------------------------------------------
def _rel_err(got: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    if got is None or ref is None:
        return 0.0 if got is None and ref is None else math.inf
    if got.shape != ref.shape:
        return math.inf
    if ref.numel() == 0:  # both absent (the ops' empty marker)
        return 0.0
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item() or 1.0
    return (got - ref).abs().max().item() / scale


@contextlib.contextmanager
def _ieee_float32_convs() -> Iterator[None]:
    """Within the block cuDNN runs float32 convolutions in IEEE float32, not TF32 (whose
    11-bit significand would swamp the float32 tolerances on either route)."""
    conv = torch.backends.cudnn.conv
    was = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = was


def compare_on_gpu(device: str = "cuda", seed: int = 0) -> list[tuple[str, str, float, float]]:
    """Run every kernel on random inputs in each dtype against :mod:`ovsw.testing`'s
    formulas run by libtorch in that dtype (with IEEE float32 convolutions), the
    library's ops on the fused route against themselves on the libtorch route, the
    AGS+SAD figures against the float64 reference.

    Returns ``(kernel, case, max relative error, tolerance)`` rows; needs a CUDA device
    and the kernels available (it raises where they are not).
    """
    with _ieee_float32_convs():
        return _compare_all(device, seed)


def _compare_all(device: str, seed: int) -> list[tuple[str, str, float, float]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows: list[tuple[str, str, float, float]] = []

    def randn(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # The reference values: ovsw.testing's formulas run by libtorch in the kernels' dtype
    # (each op rounded to it, as the kernels round), the scale's sum in float64.
    for dt in DTYPES:
        tol = TOLERANCE[dt]
        name = str(dt).replace("torch.", "")
        for layout in ("nchw", "channels_last"):
            x = randn(6, 16, 9, 11, dtype=dt) * 0.7 + 0.2
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            case = f"{name} {layout}"
            # Forward glue: std and sign(x / std) in the input's dtype.
            a, std = _core.cuda_binarize_activation(x, True, name)
            ref_std = _testing.sample_std(x)
            rows.append(("sample std", case, _rel_err(std, ref_std), tol))
            mism = (a != _testing.binarize_activation(x / ref_std)).float().mean().item()
            rows.append(("sign(x/std)", case, mism, 1e-3 if dt != torch.float32 else 0.0))
            rows.append(("layout kept", case, float(a.stride() != x.stride()), 0.0))
            # Bi-Real backward (an NCHW gradient, also against channels_last x).
            grad_a = randn(6, 16, 9, 11, dtype=dt)
            got = _core.cuda_bireal_backward(grad_a, x, ref_std)
            ref = _testing.activation_grad(grad_a, x, ref_std)
            rows.append(("bireal backward", case, _rel_err(got, ref), tol))
        for act_w in _testing.ACT_W:
            w = randn(12, 4, 3, 3, dtype=dt, scale=0.5)
            case = f"{name} {act_w}"
            w_eff, alpha, _ = _core.cuda_weight_operand(w, act_w, None, None, False, name)
            w_b = _testing.binarize_weight(w, act_w)
            rows.append(("weight w_b", case, _rel_err(w_eff, w_b), tol))
            rows.append(("weight alpha", case, _rel_err(alpha, _testing.channel_alpha(w)), tol))
            gw = randn(12, 4, 3, 3, dtype=dt)
            s = alpha
            got_w, got_s, _ = _core.cuda_weight_grads(
                gw, None, w, act_w, s, None, (True, True, False)
            )
            # w_eff = w_b * s: the gradient of w_b is gw * s, that of s is sum(gw * w_b).
            ref_w = (gw * s.view(-1, 1, 1, 1)) * _testing.weight_grad_mask(w, act_w)
            ref_s = (gw.double() * w_b.double()).sum(dim=(1, 2, 3))
            rows.append(("weight grad", case, _rel_err(got_w, ref_w), tol))
            rows.append(("scale grad", case, _rel_err(got_s, ref_s), tol * 10))
    rows += _compare_conv(device, g)
    rows += _compare_ags_sad(device, g)
    return rows


def _fused_row(op: str, before, case: str) -> tuple[str, str, float, float] | None:
    """A failing row when ``op`` did not run the kernels exactly once since ``before``."""
    fused, declined = route_delta(before)[op]
    if (fused, declined) == (1, 0):
        return None
    why = route_counts()[op]["last_declined"]
    return (
        f"{op} took the fused route",
        f"{case}: {fused} fused, {declined} declined ({why})",
        math.inf,
        0.0,
    )


def _compare_conv(device, g) -> list[tuple[str, str, float, float]]:
    """The library's binary conv (``_core.binary_conv2d_forward``/``_backward``, the ops
    ``OvSWConv2d`` calls) on the fused route against itself on the libtorch route."""
    rows = []
    for dt in DTYPES:
        for act_w in ("ste", "hardtanhv2"):
            for learnable in (False, True):
                x = (torch.randn(4, 8, 10, 10, generator=g)).to(device, dt)
                w = (torch.randn(12, 4, 3, 3, generator=g) * 0.3).to(device, dt)
                scale = _core.channel_abs_mean(w) if learnable else None
                args = (x, w, None, scale, act_w, (1, 1), (1, 1), (1, 1), 2, True)
                case = f"{str(dt)[6:]} {act_w}{' scale' if learnable else ''}"
                before = route_counts()
                got = _core.binary_conv2d_forward(*args)
                bad = _fused_row("conv_forward", before, case)
                with disabled():
                    ref = _core.binary_conv2d_forward(*args)
                tol = TOLERANCE[dt] * 10
                rows.append(("conv forward y", case, _rel_err(got[0], ref[0]), tol))
                rows += [bad] if bad else []
                grad_y = torch.randn(ref[0].shape, generator=g).to(device, ref[0].dtype)
                needs = (True, True, False, learnable)
                geo = ((1, 1), (1, 1), (1, 1), 2, needs)
                # Each backward from what its own forward saved.
                before = route_counts()
                got_g = _core.binary_conv2d_backward(
                    grad_y, x, w, False, scale, got[1], got[2], got[3], act_w, *geo
                )
                bad = _fused_row("conv_backward", before, case)
                with disabled():
                    ref_g = _core.binary_conv2d_backward(
                        grad_y, x, w, False, scale, ref[1], ref[2], ref[3], act_w, *geo
                    )
                for label, a, b in zip(("grad x", "grad w", "grad b", "grad scale"), got_g, ref_g):
                    rows.append((f"conv backward {label}", case, _rel_err(a, b), tol))
                rows += [bad] if bad else []
    return rows


# Unit roundoff of float32: the fused AGS+SAD takes each norm's root, the ratio and the
# SAD arithmetic in float32 whatever the weights' dtype (sums of squares in float64).
_U32 = 2.0**-24


def ags_sad_reference(
    cfg: Any,
    grads: list[torch.Tensor],
    weights: list[torch.Tensor],
    trackers: list[torch.Tensor | None],
    prevs: list[torch.Tensor | None],
) -> dict[str, Any]:
    """The float64 reference for the figures of ``_core.ags_sad_step(cfg, grads, ...)``
    on these inputs (taken before the step; none is modified), with the bounds within
    which the fused figures must lie. SPEC 2 and 3 as :func:`ovsw.testing.ags_sad_layer`
    (plain torch ops) on float64 copies.

    Returns ``{"figures", "ags_bound", "silent_low", "silent_high"}``: ``figures`` the
    exact ``[L, 2]`` float64 figures (NaN where a part is disabled); ``ags_bound[l]`` the
    largest relative error of layer l's ``ags_ratio``; ``[silent_low[l],
    silent_high[l]]`` the interval its ``silent_ratio`` must fall in.

    The bounds, from the formats' rounding: the kernel sums squares in float64 and
    rounds each norm and then the ratio ``r_o`` to float32, so every ``r_o``, hence
    their mean, is within ``3 u32`` (``u32 = 2**-24``) plus the float64 sums' ``(K + C)
    2**-52`` relative error for every dtype (the inputs are exact in float64). The
    tracker update ``m T + (1 - m) flipped`` is rounded per op in float32 and then in
    the tracker's dtype (unit roundoff ``u``), and ``tau`` too: a weight whose exact
    tracker lies within ``(3 u32 + 2 u) T + (u32 + u) tau`` (plus two of the dtype's
    smallest subnormals) of ``tau`` may fall on either side, so the silent ratio lies
    between the share of weights surely below ``tau`` and the share possibly below it
    (for float32 inputs the band is usually empty and the bounds equal). Each slack is
    taken one unit wider as a margin.
    """
    figures, ags_bound, lows, highs = [], [], [], []
    tau = float(cfg.track_threshold)
    for grad, weight, tracker, prev in zip(grads, weights, trackers, prevs):
        g, w = grad.detach().double().clone(), weight.detach().double().clone()
        t = None if tracker is None else tracker.double().clone()
        p = None if prev is None else prev.double().clone()
        r, mask = _testing.ags_sad_layer(
            g,
            w,
            t,
            p,
            enable_ags=cfg.enable_ags,
            delta=cfg.delta,
            enable_dampen=cfg.enable_dampen,
            dampen_weight=cfg.dampen_weight,
            track_momentum=cfg.track_momentum,
            track_threshold=tau,
        )
        channels, per_channel = weight.shape[0], weight[0].numel()
        ags = math.nan if r is None else r.mean().item()
        ags_bound.append(4 * _U32 + (per_channel + channels + 2) * 2.0**-52)
        if mask is None or t is None:
            silent = low = high = math.nan
        else:
            fi = torch.finfo(tracker.dtype)
            u = fi.eps / 2
            tiny = fi.smallest_normal * fi.eps  # the smallest subnormal
            slack = (4 * _U32 + 3 * u) * t.abs() + (2 * _U32 + 2 * u) * tau + 3 * tiny
            silent = mask.double().mean().item()
            low = (t < tau - slack).double().mean().item()
            high = (t < tau + slack).double().mean().item()
        figures.append((ags, silent))
        lows.append(low)
        highs.append(high)
    return {
        "figures": torch.tensor(figures, dtype=torch.float64).reshape(-1, 2),
        "ags_bound": ags_bound,
        "silent_low": lows,
        "silent_high": highs,
    }


def compare_ags_sad_figures(
    got: torch.Tensor, ref: dict[str, Any], case: str
) -> list[tuple[str, str, float, float]]:
    """Rows ``(figure, case, error, tolerance)`` judging fused AGS+SAD figures ``got``
    (``[L, 2]``) against :func:`ags_sad_reference`: per layer the ``ags_ratio``'s
    relative error against its bound, and the ``silent_ratio``'s distance from the exact
    figure against the distance to the interval's edge on that side. A row fails where
    ``not error <= tolerance`` (NaN fails; NaN on both sides, a disabled part, is 0)."""
    got = got.detach().to("cpu", torch.float64)
    exact = ref["figures"]
    if got.shape != exact.shape:
        return [("ags+sad figures shape", f"{case}: {tuple(got.shape)}", math.inf, 0.0)]
    rows = []
    for layer in range(exact.shape[0]):
        where = f"{case} layer {layer}"
        a, e = got[layer, 0].item(), exact[layer, 0].item()
        if math.isnan(a) and math.isnan(e):
            err = 0.0
        else:
            err = abs(a - e) / abs(e) if e else abs(a)
        rows.append(("ags_ratio (float64 ref)", where, err, ref["ags_bound"][layer]))
        a, e = got[layer, 1].item(), exact[layer, 1].item()
        if math.isnan(a) and math.isnan(e):
            err, tol = 0.0, 0.0
        else:
            edge = ref["silent_high"][layer] if a > e else ref["silent_low"][layer]
            err, tol = abs(a - e), abs(edge - e) + 1e-15
        rows.append(("silent_ratio (float64 ref)", where, err, tol))
    return rows


def compare_ags_sad(device: str = "cuda", seed: int = 0) -> list[tuple[str, str, float, float]]:
    """The library's AGS+SAD (``_core.ags_sad_step``, what ``OvSW.step`` calls) on the
    fused route: its figures against the float64 reference (:func:`ags_sad_reference`,
    :func:`compare_ags_sad_figures`), the gradient, tracker and previous weights it
    leaves against the libtorch route's. On ``"cpu"`` it needs the host launcher
    (``_core.cuda_set_host_launcher(True)``), which gives CPU tensors the fused route."""
    return _compare_ags_sad(device, torch.Generator(device="cpu").manual_seed(seed))


def _compare_ags_sad(device, g) -> list[tuple[str, str, float, float]]:
    rows = []
    cfg = _core.OvSWConfig(enable_ags=True, delta=0.5, enable_dampen=True, dampen_weight=1e-3)
    for dt in DTYPES:
        shapes = [(16, 8, 3, 3), (32, 16, 3, 3), (8, 4, 1, 1)]
        mk = [
            {
                "grad": torch.randn(s, generator=g).to(device, dt) * 0.01,
                "weight": torch.randn(s, generator=g).to(device, dt) * 0.1,
                "tracker": (torch.rand(s, generator=g) * 2e-4).to(device, dt),
                "prev": torch.randn(s, generator=g).to(device, dt) * 0.1,
            }
            for s in shapes
        ]
        ref = [{k: v.clone() for k, v in d.items()} for d in mk]
        name = str(dt)[6:]
        exact = ags_sad_reference(
            cfg, *([d[k] for d in mk] for k in ("grad", "weight", "tracker", "prev"))
        )
        before = route_counts()
        got = _core.ags_sad_step(
            cfg,
            [d["grad"] for d in mk],
            [d["weight"] for d in mk],
            [d["tracker"] for d in mk],
            [d["prev"] for d in mk],
        )
        bad = _fused_row("ags_sad_step", before, name)
        with disabled():
            _core.ags_sad_step(
                cfg,
                [d["grad"] for d in ref],
                [d["weight"] for d in ref],
                [d["tracker"] for d in ref],
                [d["prev"] for d in ref],
            )
        tol = TOLERANCE[dt]
        rows += compare_ags_sad_figures(got, exact, name)
        for k in ("grad", "tracker", "prev"):
            err = max(_rel_err(a[k], b[k]) for a, b in zip(mk, ref))
            rows.append((f"ags+sad {k}", name, err, tol))
        rows += [bad] if bad else []
    return rows


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
def _check(archs: list[int], out: Callable[[str], None]) -> int:
    st = status()
    if st.get("nvrtc") is None:
        out(f"error: {st.get('nvrtc_error', 'NVRTC not found')}")
        return 1
    major, minor = st["nvrtc_version"]
    out(f"NVRTC {major}.{minor}: {st['nvrtc']}")
    failed = 0
    for arch in archs:
        try:
            res = compile_kernels(arch)
        except RuntimeError as e:
            out(f"sm_{arch}: FAILED to compile: {e}")
            failed += 1
            continue
        ok = sum(res["entries"].values())
        out(
            f"sm_{arch}: compiled in {res['seconds']:.1f} s, PTX {len(res['ptx']) // 1024} KiB, "
            f"cubin {len(res['cubin']) // 1024} KiB, {ok}/{len(res['entries'])} kernels"
        )
        if res["log"]:
            out(f"  NVRTC log: {res['log']}")
        res_map = res["resources"]
        bad = {b.split(":")[0] for b in spills(res_map)}
        for name, present in res["entries"].items():
            r = res_map.get(name)
            mark = "ok  " if present and r is not None and name not in bad else "FAIL"
            if not present:
                mark = "MISSING"
            figs = "no ptxas report"
            if r is not None:
                figs = (
                    f"{r['registers']:3d} registers, {r['shared']:5d} B shared, "
                    f"spill {r['spill_stores']}/{r['spill_loads']} B stores/loads"
                )
            out(f"  {mark} sm_{arch} {name:32s} {figs}")
            failed += mark != "ok  "
        if res_map:
            top = max(res_map, key=lambda n: res_map[n]["registers"])
            out(
                f"sm_{arch} ptxas: at most {res_map[top]['registers']} registers ({top}), "
                f"{max(r['shared'] for r in res_map.values())} B static shared, "
                f"{len(bad)} kernels spilling"
            )
    if not torch.cuda.is_available():
        out("no CUDA device: kernels compiled only, not run")
        return 1 if failed else 0
    if "driver_version" not in status():
        out(f"error: {status().get('driver_error')}")
        return 1
    out(f"running on {torch.cuda.get_device_name()} (driver {status()['driver_version']})")
    for kernel, case, err, tol in compare_on_gpu():
        bad = not err <= tol
        failed += bad
        mark = "FAIL" if bad else "ok  "
        out(f"  {mark} {kernel:26s} {case:28s} max err {err:.2e} (tol {tol:.1e})")
    out("all kernels ok" if not failed else f"{failed} failures")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ovsw.cuda", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="compile every kernel (and run them on a GPU)")
    chk.add_argument(
        "--arch",
        type=int,
        action="append",
        help="sm_XY as XY; repeatable (default: 80 and 90)",
    )
    args = ap.parse_args(argv)
    return _check(args.arch or list(ARCHS), print)


if __name__ == "__main__":
    sys.exit(main())
