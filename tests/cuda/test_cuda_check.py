"""The GPU checks' own machinery, held true without a GPU (none of these is cuda-marked).

- ``python -m ovsw.cuda check``'s resource report: ptxas's registers, shared memory and
  spills for every kernel on sm_80 and sm_90 (NVRTC from the torch wheel, no GPU), with
  no kernel spilling; its parser shown to catch a kernel made to spill.
- Its AGS+SAD comparison: the fused figures against the float64 reference, run through
  the host launcher (the CUDA route's launch code, the kernels compiled for the CPU), and
  its bounds shown to reject planted errors.
- ``scripts/gpu_check.sh`` selects every cuda-marked test of tests/.
- ``benchmarks/bench_train_step.py --device cuda`` runs (``--dry-run``: on the CPU).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ovsw
import ovsw.cuda
from ovsw import _core

ROOT = Path(__file__).resolve().parents[2]

needs_nvrtc = pytest.mark.skipif(
    torch.version.cuda is None, reason="a CPU-only torch ships no NVRTC"
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


# ---------------------------------------------------------------------------------------
# Resources: ptxas's report
# ---------------------------------------------------------------------------------------
@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_no_kernel_spills(arch):
    res = ovsw.cuda.compile_kernels(arch)
    report = res["resources"]
    assert sorted(report) == sorted(_core.cuda_entry_points()), "ptxas reported other kernels"
    for name, r in report.items():
        assert 0 < r["registers"] <= 255, (name, r)
        assert 0 <= r["shared"] <= 48 * 1024, (name, r)
    assert ovsw.cuda.spills(report) == [], f"sm_{arch}: kernels spill"
    # What NVRTC said besides ptxas's report is apart (warnings only).
    assert "ptxas" not in res["log"]


# A kernel with a 200-float array indexed by a run-time value: with at most 32 registers
# ptxas must keep it in local memory (spills); the same source without the cap does not
# need to spill its registers.
_PLANTED = r"""
extern "C" __global__ void planted(float* a, int n) {
    float v[200];
#pragma unroll
    for (int i = 0; i < 200; i++) v[i] = a[i * n + threadIdx.x];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 200; i++) s += v[i] * v[(i * 7) % 200];
    a[threadIdx.x] = s;
}
"""


def _nvrtc_log(source: str, options: list[str]) -> str:
    """NVRTC's program log for ``source``, through the NVRTC that ovsw opened."""
    path = ovsw.cuda.status()["nvrtc"]
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"p.cu", 0, None, None) == 0
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        assert lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0
        buf = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetProgramLog(prog, buf) == 0
        log = buf.value.decode()
        assert rc == 0, log
        return log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_the_spill_check_catches_a_kernel_made_to_spill(arch):
    base = [f"--gpu-architecture=sm_{arch}", "--ptxas-options=-v"]
    report, rest = ovsw.cuda.parse_ptxas_log(_nvrtc_log(_PLANTED, [*base, "--maxrregcount=32"]))
    assert rest == ""
    r = report["planted"]
    assert r["registers"] == 32  # the cap ptxas was given
    assert r["spill_stores"] > 0 and r["spill_loads"] > 0 and r["stack"] > 0
    assert [s.split(":")[0] for s in ovsw.cuda.spills(report)] == ["planted"]
    # Without the cap: more registers, and the parser reports no spill where ptxas says
    # "0 bytes spill stores, 0 bytes spill loads".
    log = _nvrtc_log(_PLANTED, base)
    report, _ = ovsw.cuda.parse_ptxas_log(log)
    assert report["planted"]["registers"] > 32
    if "0 bytes spill stores, 0 bytes spill loads" in log:
        assert ovsw.cuda.spills(report) == []


def test_parser_counts_a_missing_figure_as_a_failure():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
        "ptxas info    : Function properties for k\n"
        "ptxas info    : Used 20 registers, used 0 barriers\n"
    )
    report, _ = ovsw.cuda.parse_ptxas_log(log)
    assert report["k"]["registers"] == 20 and report["k"]["spill_stores"] == -1
    assert ovsw.cuda.spills(report) == ["k: ptxas reported no stack, spill_stores, spill_loads"]


def test_parser_keeps_ptxas_warnings_apart_from_the_report():
    """ptxas's warnings are no part of its report: they stay in the rest of the log,
    where ``test_no_kernel_spills`` requires none (a line NVRTC 13.0 writes for a
    register cap below the architecture's floor)."""
    warning = (
        "ptxas warning : For profile sm_90 adjusting per thread register count of 16 "
        "to lower bound of 24"
    )
    log = (
        f"{warning}\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
        "ptxas info    : Function properties for k\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 24 registers, used 0 barriers\n"
    )
    report, rest = ovsw.cuda.parse_ptxas_log(log)
    assert rest == warning
    assert report["k"]["registers"] == 24 and ovsw.cuda.spills(report) == []


def test_parser_adds_a_callees_spills_reported_before_the_entrys_own():
    """A callee's report between the entry's "Compiling" line and its own: the entry's
    own "0 bytes spill" line must not wipe out the callee's spills."""
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z6calleePfi\n"
        "ptxas         .     0 bytes stack frame, 1036 bytes spill stores, 1196 bytes spill loads\n"
        "ptxas info    : Function properties for k\n"
        "ptxas         .     8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 24 registers, used 0 barriers\n"
    )
    report, _ = ovsw.cuda.parse_ptxas_log(log)
    assert report["k"] == {
        "registers": 24,
        "shared": 0,
        "stack": 8,
        "spill_stores": 1036,
        "spill_loads": 1196,
    }
    assert [s.split(":")[0] for s in ovsw.cuda.spills(report)] == ["k"]


# ---------------------------------------------------------------------------------------
# The AGS+SAD figures against float64, through the host launcher
# ---------------------------------------------------------------------------------------
@pytest.fixture
def host_launcher():
    _core.cuda_set_host_launcher(True)
    try:
        yield
    finally:
        _core.cuda_set_host_launcher(False)


@pytest.mark.slow
def test_check_ags_sad_comparison_passes_on_the_fused_route(host_launcher):
    """The check's AGS+SAD comparison, as it runs on a GPU, on the CUDA route's launch
    code with the kernels compiled for the CPU: every row within its bound."""
    rows = ovsw.cuda.compare_ags_sad("cpu")
    bad = [r for r in rows if not r[2] <= r[3]]
    assert not bad, bad
    figures = [r for r in rows if "(float64 ref)" in r[0]]
    # 3 dtypes x 3 layers x (ags_ratio, silent_ratio); no row says the route declined.
    assert len(figures) == 18
    assert not [r for r in rows if "took the fused route" in r[0]]
    for dt in ("float32", "float16", "bfloat16"):
        assert sum(r[1].startswith(dt + " ") for r in figures) == 6


def _layers(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8, 3, 3), (24, 6, 3, 3)]
    return [
        {
            "grad": (torch.randn(s, generator=g) * 0.01).to(dtype),
            "weight": (torch.randn(s, generator=g) * 0.1).to(dtype),
            "tracker": (torch.rand(s, generator=g) * 2e-4).to(dtype),
            "prev": (torch.randn(s, generator=g) * 0.1).to(dtype),
        }
        for s in shapes
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_figure_bounds_reject_planted_errors(host_launcher, dtype):
    cfg = _core.OvSWConfig(enable_ags=True, delta=0.5, enable_dampen=True, dampen_weight=1e-3)
    layers = _layers(dtype)
    args = [[d[k] for d in layers] for k in ("grad", "weight", "tracker", "prev")]
    ref = ovsw.cuda.ags_sad_reference(cfg, *args)
    before = ovsw.cuda.route_counts()["ags_sad_step"]["fused"]
    got = _core.ags_sad_step(cfg, *args)
    assert ovsw.cuda.route_counts()["ags_sad_step"]["fused"] == before + 1

    def failures(figs):
        return [r for r in ovsw.cuda.compare_ags_sad_figures(figs, ref, "t") if not r[2] <= r[3]]

    assert failures(got) == []
    assert failures(ref["figures"]) == []
    # ags_ratio off by twice its bound (about 5e-7 relative: float32's rounding, not the
    # storage dtype's, bounds it).
    for layer in range(2):
        bad = got.clone()
        bad[layer, 0] *= 1 + 2 * ref["ags_bound"][layer]
        assert [r[1] for r in failures(bad)] == [f"t layer {layer}"]
        # silent_ratio one weight past either end of its interval.
        n = layers[layer]["weight"].numel()
        for edge, step in (("silent_high", 1), ("silent_low", -1)):
            bad = got.clone()
            bad[layer, 1] = ref[edge][layer] + step / n
            assert [r[0] for r in failures(bad)] == ["silent_ratio (float64 ref)"]
        bad = got.clone()
        bad[layer, 0] = math.nan
        assert len(failures(bad)) == 1
    assert failures(got[:1]) != []  # a layer missing


# ---------------------------------------------------------------------------------------
# scripts/gpu_check.sh runs every cuda-marked test
# ---------------------------------------------------------------------------------------
_COLLECT = """
import json, sys
import pytest

class Items:
    def pytest_collection_finish(self, session):
        self.items = [(i.nodeid, i.get_closest_marker("cuda") is not None) for i in session.items]

p = Items()
rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[p])
print("ITEMS " + json.dumps(p.items))
sys.exit(rc)
"""


def _collect(args: list[str]) -> list[tuple[str, bool]]:
    proc = subprocess.run(
        [sys.executable, "-c", _COLLECT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ITEMS "))
    return [tuple(i) for i in json.loads(line[len("ITEMS ") :])]


def _gpu_check_selection() -> list[str]:
    """The pytest arguments scripts/gpu_check.sh's step 2 passes (its CUDA_TESTS)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    m = re.search(r"^CUDA_TESTS=\((.*)\)$", script, re.MULTILINE)
    assert m, "gpu_check.sh sets no CUDA_TESTS=(...)"
    step = re.search(r'^run 2 .*"\$\{CUDA_TESTS\[@\]\}"$', script, re.MULTILINE)
    assert step, "gpu_check.sh's step 2 does not run pytest on CUDA_TESTS"
    return shlex.split(m.group(1))


@pytest.mark.slow
def test_gpu_check_runs_every_cuda_marked_test():
    selected = {nodeid for nodeid, _ in _collect(_gpu_check_selection())}
    marked = {nodeid for nodeid, cuda in _collect(["tests"]) if cuda}
    assert marked, "no cuda-marked test collected"
    assert selected == marked, {
        "left out": sorted(marked - selected),
        "not cuda-marked": sorted(selected - marked),
    }
    # The files it once left out are among them.
    files = {n.split("::")[0] for n in marked}
    once_left_out = {
        "tests/layers/test_ops.py",
        "tests/layers/test_compile.py",
        "tests/optim/test_analysis.py",
    }
    assert once_left_out <= files


# ---------------------------------------------------------------------------------------
# benchmarks/bench_train_step.py
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cuda_benchmark_runs_dry_on_the_cpu():
    """The CUDA benchmark's code (the three implementations, route tally, timings) on the
    CPU through the host launcher: it runs, and "ovsw" took the fused route."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_train_step.py"),
            "--device",
            "cuda",
            "--dry-run",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ovsw ran on the fused CUDA route: conv_forward " in out
    results = json.loads(out.strip().splitlines()[-1])
    (case,) = results.values()
    for impl in ("oracle", "ovsw", "libtorch"):
        assert case[f"{impl}_step_ms"] > 0 and case[f"{impl}_ags_sad_ms"] > 0
