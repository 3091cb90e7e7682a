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
point; on a machine with a GPU it also runs every kernel against the libtorch path on
random inputs in float32, float16 and bfloat16 and prints the maximum errors. It exits
non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch

from . import _core

__all__ = [
    "status",
    "enabled",
    "set_enabled",
    "disabled",
    "route_counts",
    "compile_kernels",
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

    Returns ``{"arch", "seconds", "ptx", "cubin", "log", "entries"}`` where ``entries``
    maps each kernel name to whether both the PTX and the cubin hold it.
    """
    t0 = time.perf_counter()
    ptx, cubin, log, declared = _core.cuda_compile(arch)
    seconds = time.perf_counter() - t0
    entries = {
        name: name in declared and name.encode() in cubin for name in _core.cuda_entry_points()
    }
    return {
        "arch": arch,
        "seconds": seconds,
        "ptx": ptx,
        "cubin": cubin,
        "log": log,
        "entries": entries,
    }


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


def _ref_std(x: torch.Tensor) -> torch.Tensor:
    return (x.var(dim=(1, 2, 3), keepdim=True) + 1e-5).sqrt()


def _bireal_ref(g, x, std):
    g = g.to(x.dtype)
    x_hat = x / std if std is not None else x
    t = (x_hat.abs() * -2.0 + 2.0).clamp_min(0.0)
    out = g * t
    return out / std if std is not None else out


def _abs_mean(w):
    return w.reshape(w.shape[0], -1).abs().mean(dim=1)


def _binarized(w, act_w):
    wb = w.sign()
    if act_w == "ste_v2":
        wb = wb * _abs_mean(w).view(-1, 1, 1, 1)
    return wb


def _mask(w, act_w):
    if act_w == "hardtanh":
        return (w.abs() < 1).to(w.dtype)
    if act_w == "hardtanhv2":
        return (w.abs() < _abs_mean(w).view(-1, 1, 1, 1)).to(w.dtype)
    return torch.ones_like(w)


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
    """Run every kernel on random inputs in each dtype against the libtorch path (with
    IEEE float32 convolutions), the library's ops on the fused route against themselves
    on the libtorch route.

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

    spec_names = ("ste", "hardtanh", "ste_v2", "hardtanhv2")
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
            ref_std = _ref_std(x)
            rows.append(("sample std", case, _rel_err(std, ref_std), tol))
            mism = (a != (x / ref_std).sign()).float().mean().item()
            rows.append(("sign(x/std)", case, mism, 1e-3 if dt != torch.float32 else 0.0))
            rows.append(("layout kept", case, float(a.stride() != x.stride()), 0.0))
            # Bi-Real backward (an NCHW gradient, also against channels_last x).
            grad_a = randn(6, 16, 9, 11, dtype=dt)
            got = _core.cuda_bireal_backward(grad_a, x, ref_std)
            ref = _bireal_ref(grad_a, x, ref_std)
            rows.append(("bireal backward", case, _rel_err(got, ref), tol))
        for act_w in spec_names:
            w = randn(12, 4, 3, 3, dtype=dt, scale=0.5)
            case = f"{name} {act_w}"
            w_eff, alpha, _ = _core.cuda_weight_operand(w, act_w, None, None, False, name)
            rows.append(("weight w_b", case, _rel_err(w_eff, _binarized(w, act_w)), tol))
            rows.append(("weight alpha", case, _rel_err(alpha, _core.channel_alpha(w)), tol))
            gw = randn(12, 4, 3, 3, dtype=dt)
            s = alpha
            got_w, got_s, _ = _core.cuda_weight_grads(
                gw, None, w, act_w, s, None, (True, True, False)
            )
            ref_w = (gw * s.view(-1, 1, 1, 1)) * _mask(w, act_w)
            ref_s = (gw.double() * _binarized(w, act_w).double()).sum(dim=(1, 2, 3))
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


def _compare_ags_sad(device, g) -> list[tuple[str, str, float, float]]:
    """The library's AGS+SAD (``_core.ags_sad_step``, what ``OvSW.step`` calls) on the
    fused route against itself on the libtorch route."""
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
            figs = _core.ags_sad_step(
                cfg,
                [d["grad"] for d in ref],
                [d["weight"] for d in ref],
                [d["tracker"] for d in ref],
                [d["prev"] for d in ref],
            )
        tol = TOLERANCE[dt]
        rows.append(("ags+sad figures", name, _rel_err(got.cpu(), figs.cpu()), 1e-5))
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
        for name, present in res["entries"].items():
            out(f"  {'ok  ' if present else 'MISSING'} sm_{arch} {name}")
            failed += not present
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
        out(f"  {mark} {kernel:26s} {case:28s} max err {err:.2e} (tol {tol:.0e})")
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
