"""The flip monitor (issue 14): ``ovsw.analysis.FlipMonitor`` and the Rust core's
``flip_monitor_step`` against a plain-PyTorch oracle written from the definitions,
both routes (fused float32 CPU loops, libtorch ops), SAD's tracker and the monitor's
own, exact resume from a state_dict, the histogram, ``silent.csv`` and the plots."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ovsw
import ovsw.analysis
from conftest import tiny_net
from ovsw import _core
from ovsw.analysis import FIGURES, FlipMonitor

M, TAU = 0.9, 0.05  # a short memory, so that trackers cross the threshold within a test


# -- the oracle ---------------------------------------------------------------------------------


class Oracle:
    """The monitor's figures from SPEC section 3's definitions, in float64: a flip is
    ``sign(W) != sign(W_before)``; never flipped: no flip since the start; the tracker
    ``T <- m T + (1 - m) flipped`` (or SAD's, given); silent ``T < tau``; the flip rate
    the EMA of the flipped share divided by ``1 - m^t``."""

    def __init__(self, weights, m=M, tau=TAU):
        self.sign = [torch.sign(w.double()) for w in weights]
        self.ever = [torch.zeros_like(w, dtype=torch.bool) for w in weights]
        self.tracker = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
        self.ema = [0.0] * len(weights)
        self.m, self.tau, self.t = m, tau, 0

    def step(self, weights, sad_trackers=None):
        self.t += 1
        rows = []
        for i, w in enumerate(weights):
            now = torch.sign(w.double())
            flipped = now != self.sign[i]
            self.sign[i] = now
            self.ever[i] |= flipped
            if sad_trackers is None:
                self.tracker[i] = self.m * self.tracker[i] + (1 - self.m) * flipped.double()
                tracker = self.tracker[i]
            else:
                tracker = sad_trackers[i].double()
            share = flipped.double().mean().item()
            self.ema[i] = self.m * self.ema[i] + (1 - self.m) * share
            rows.append(
                [
                    share,
                    1.0 - self.ever[i].double().mean().item(),
                    (tracker < self.tau).double().mean().item(),
                    self.ema[i] / (1 - self.m**self.t),
                ]
            )
        return torch.tensor(rows, dtype=torch.float64)


def _walk(shapes, dtype, steps, seed=0):
    """Weights that move by small random steps (so that some signs flip each step, and
    some weights sit at exactly 0 now and then)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g).to(dtype) * 0.1 for s in shapes]
    ws[0].view(-1)[:5] = 0.0
    out = [[w.clone() for w in ws]]
    for t in range(steps):
        ws = [w + (0.04 * torch.randn(w.shape, generator=g)).to(dtype) for w in ws]
        if t % 3 == 0:
            ws[-1].view(-1)[:7] = 0.0
        out.append([w.clone() for w in ws])
    return out


def _states(weights, own=True):
    return [list(_core.flip_monitor_state(w, own)) for w in weights]


def _core_step(weights, states, rates, step, trackers=None, m=M, tau=TAU):
    own = trackers is None
    return _core.flip_monitor_step(
        weights,
        [s[0] for s in states],
        [s[1] for s in states],
        [s[2] for s in states] if own else trackers,
        rates,
        step,
        _core.FlipMonitorConfig(m, tau, own),
    )


# (4, 3, 3, 3) is small; (72, 64, 3, 3) holds more than one task's worth of elements
SHAPES = ((4, 3, 3, 3), (72, 64, 3, 3), (6, 4, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "generic"])
def test_figures_match_the_oracle_with_the_monitors_own_tracker(dtype):
    walk = _walk(SHAPES, dtype, steps=12)
    states = _states(walk[0])
    oracle = Oracle(walk[0])
    rates = torch.zeros(len(SHAPES), dtype=torch.float64)
    seen_flip = seen_silent_change = False
    for t, ws in enumerate(walk[1:], start=1):
        figures = _core_step(ws, states, rates, t)
        expected = oracle.step(ws)
        assert figures.dtype == torch.float64 and figures.shape == (len(SHAPES), 4)
        torch.testing.assert_close(figures, expected, rtol=1e-12, atol=1e-12)
        for (sign, ever, tracker), w, o_ever, o_t in zip(states, ws, oracle.ever, oracle.tracker):
            assert sign.dtype == torch.int8 and torch.equal(sign, torch.sign(w).to(torch.int8))
            assert torch.equal(ever, o_ever)
            torch.testing.assert_close(tracker.double(), o_t, rtol=1e-5, atol=1e-6)
        seen_flip |= bool((expected[:, 0] > 0).all())
        seen_silent_change |= bool(((expected[:, 2] > 0) & (expected[:, 2] < 1)).any())
    # the walk exercises what it should: flips in every layer, silent shares in between
    assert seen_flip and seen_silent_change
    assert (expected[:, 1] < 1).all() and (expected[:, 1] > 0).all()


def test_the_fused_and_generic_routes_agree_exactly_on_float32():
    """The same float32 weights, contiguous (fused loops) and as strided views of a
    larger tensor (libtorch ops): identical figures and state, step after step."""
    walk = _walk(SHAPES, torch.float32, steps=8, seed=3)
    fused_states, generic_states = _states(walk[0]), _states(walk[0])
    r1, r2 = (torch.zeros(len(SHAPES), dtype=torch.float64) for _ in range(2))
    for t, ws in enumerate(walk[1:], start=1):
        strided = []
        for w in ws:
            big = torch.zeros(*w.shape[:-1], w.shape[-1] + 2)
            big[..., 1:-1] = w
            view = big[..., 1:-1]
            assert not view.is_contiguous()
            strided.append(view)
        a = _core_step(ws, fused_states, r1, t)
        b = _core_step(strided, generic_states, r2, t)
        assert torch.equal(a, b)
        for sa, sb in zip(fused_states, generic_states):
            assert all(torch.equal(x, y) for x, y in zip(sa, sb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused", "generic"])
def test_sads_tracker_is_read_and_never_written(dtype):
    walk = _walk(SHAPES, dtype, steps=5, seed=1)
    states = _states(walk[0], own=False)
    assert all(s[2] is None for s in states)
    oracle = Oracle(walk[0])
    rates = torch.zeros(len(SHAPES), dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    for t, ws in enumerate(walk[1:], start=1):
        # SAD's trackers: values on both sides of the threshold, some exactly at it
        trackers = [(torch.rand(w.shape, generator=g) * 2 * TAU).to(dtype) for w in ws]
        trackers[0].view(-1)[:3] = TAU
        before = [t_.clone() for t_ in trackers]
        figures = _core_step(ws, states, rates, t, trackers=trackers)
        torch.testing.assert_close(figures, oracle.step(ws, trackers), rtol=1e-12, atol=1e-12)
        assert all(torch.equal(a, b) for a, b in zip(trackers, before))


def test_the_generic_route_makes_no_host_copy():
    """Meta tensors have no elements: a step on them that returns meta figures never
    copied anything to the host."""
    ws = [torch.randn(s) for s in SHAPES]
    states = [[x.to("meta") for x in s] for s in _states(ws)]
    meta_ws = [w.to("meta") for w in ws]
    figures = _core_step(meta_ws, states, torch.zeros(3, dtype=torch.float64, device="meta"), 1)
    assert figures.device.type == "meta" and figures.shape == (3, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_figures_match_the_cpu_and_the_step_does_not_synchronize(dtype):
    walk = _walk(SHAPES, torch.float32, steps=5, seed=2)
    walk = [[w.to(dtype).float() for w in ws] for ws in walk]  # values dtype can hold
    cpu_states = _states(walk[0])
    gpu_states = _states([w.to("cuda", dtype) for w in walk[0]])
    r_cpu = torch.zeros(len(SHAPES), dtype=torch.float64)
    r_gpu = torch.zeros(len(SHAPES), dtype=torch.float64, device="cuda")
    for t, ws in enumerate(walk[1:], start=1):
        expected = _core_step(ws, cpu_states, r_cpu, t)
        gws = [w.to("cuda", dtype) for w in ws]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _core_step(gws, gpu_states, r_gpu, t)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert got.device.type == "cuda" and got.dtype == torch.float64
        # fp16 trackers round differently, but within 5 steps of m = 0.9 a flipped
        # weight's tracker stays above 0.06 > tau: the same weights are silent
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)
        for a, b in zip(cpu_states, gpu_states):
            assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


def test_bad_core_input_is_a_python_exception():
    CONFIG = _core.FlipMonitorConfig(M, TAU, True)
    ws = [torch.randn(4, 3, 3, 3)]
    states = _states(ws)
    rates = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        _core_step([torch.randn(4, 3, 3, 2)], states, rates, 1)
    with pytest.raises(TypeError, match="int8"):
        _core.flip_monitor_step(
            ws, [states[0][0].float()], [states[0][1]], [states[0][2]], rates, 1, CONFIG
        )
    with pytest.raises(ValueError, match="rates"):
        _core_step(ws, states, torch.zeros(2, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match=">= 1"):
        _core_step(ws, states, rates, 0)
    with pytest.raises(ValueError, match=r"track_momentum must be in \[0, 1\), got 1"):
        _core_step(ws, states, rates, 1, m=1.0)
    with pytest.raises(ValueError, match="track_threshold"):
        _core.FlipMonitorConfig(M, -1.0, True)
    with pytest.raises(ValueError, match="got 1 weights, 2 signs"):
        _core.flip_monitor_step(
            ws, [states[0][0]] * 2, [states[0][1]], [states[0][2]], rates, 1, CONFIG
        )
    with pytest.raises(TypeError, match="floating"):
        _core.flip_monitor_state(torch.zeros(3, dtype=torch.int64), True)


# -- FlipMonitor on a training loop -------------------------------------------------------------


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def _train(model, opt, monitor, steps, first=0):
    for s in range(first, first + steps):
        x, y = _batch(s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        monitor.update()


def _weights(model):
    return [m.weight.detach().clone() for _, m in ovsw.binary_convs(model)]


def test_monitor_on_sgd_follows_the_oracle():
    torch.manual_seed(0)
    model = tiny_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    monitor = FlipMonitor(model, opt, track_momentum=M, track_threshold=TAU)
    assert not monitor.uses_sad_tracker and monitor.stats() == [] and monitor.total() is None
    oracle = Oracle(_weights(model))
    last_never = [1.0, 1.0]
    for s in range(6):
        _train(model, opt, monitor, 1, first=s)
        expected = oracle.step(_weights(model))
        torch.testing.assert_close(monitor.figures(), expected, rtol=1e-12, atol=1e-12)
        stats = monitor.stats()
        assert [st["name"] for st in stats] == ["2", "5"]
        never = [st["never_flipped"] for st in stats]
        assert all(a <= b for a, b in zip(never, last_never))  # it can only go down
        last_never = never
    assert monitor.steps == 6 and min(last_never) < 1.0
    total = monitor.total()
    n = [st["weights"] for st in stats]
    assert total["weights"] == sum(n) == 8 * 8 * 9 + 16 * 8 * 9
    for key in FIGURES:
        assert total[key] == pytest.approx(sum(st[key] * k for st, k in zip(stats, n)) / sum(n))


def test_with_sad_the_silent_share_is_sads():
    torch.manual_seed(0)
    model = tiny_net()
    opt = ovsw.OvSW(
        torch.optim.SGD(model.parameters(), lr=0.5),
        model,
        enable_ags=True,
        delta=0.05,
        enable_dampen=True,
        dampen_weight=1e-3,
        track_momentum=M,
        track_threshold=TAU,
    )
    monitor = FlipMonitor(model, opt)
    assert monitor.uses_sad_tracker
    assert (monitor.track_momentum, monitor.track_threshold) == (M, TAU)
    seen = set()
    for s in range(8):
        _train(model, opt, monitor, 1, first=s)
        silent = [st["silent"] for st in monitor.stats()]
        assert silent == [st["silent_ratio"] for st in opt.stats()]
        seen.update(silent)
    assert any(0 < v < 1 for v in seen)  # trackers crossed the threshold both ways
    with pytest.raises(ValueError, match="track_threshold"):
        FlipMonitor(model, opt, track_threshold=TAU * 2)


def test_monitor_refuses_what_it_cannot_watch():
    with pytest.raises(ValueError, match="no binary layer"):
        FlipMonitor(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        FlipMonitor("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="track_momentum"):
        FlipMonitor(tiny_net(), track_momentum=1.0)


def _make(sad: bool, seed=0):
    torch.manual_seed(seed)
    model = tiny_net()
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opt = (
        ovsw.OvSW(inner, model, enable_dampen=True, dampen_weight=1e-3, track_momentum=M,
                  track_threshold=TAU)
        if sad
        else inner
    )  # fmt: skip
    return model, opt, FlipMonitor(model, opt, track_momentum=M, track_threshold=TAU)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("sad", [False, True], ids=["own-tracker", "sad-tracker"])
def test_resume_continues_the_count_exactly(sad):
    """k steps, save model, optimizer and monitor, build everything afresh, load, k more
    steps: the figures and state equal those of 2k uninterrupted steps."""
    k = 5
    model, opt, monitor = _make(sad)
    _train(model, opt, monitor, 2 * k)

    model2, opt2, monitor2 = _make(sad)
    _train(model2, opt2, monitor2, k)
    saved = _roundtrip(
        {"model": model2.state_dict(), "opt": opt2.state_dict(), "mon": monitor2.state_dict()}
    )
    model3, opt3, monitor3 = _make(sad, seed=1)  # other initial weights: all must come back
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    monitor3.load_state_dict(saved["mon"])
    assert monitor3.steps == k
    _train(model3, opt3, monitor3, k, first=k)

    assert torch.equal(monitor.figures(), monitor3.figures())
    a, b = monitor.state_dict(), monitor3.state_dict()
    assert a["steps"] == b["steps"] == 2 * k
    for key in ("sign", "ever_flipped", "tracker"):
        assert len(a[key]) == len(b[key]) == (0 if sad and key == "tracker" else 2)
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert torch.equal(a["rates"], b["rates"])
    # and a fresh monitor over the resumed model would not: it restarts the count
    fresh = FlipMonitor(model3, opt3, track_momentum=M, track_threshold=TAU)
    _train(model3, opt3, fresh, 1, first=2 * k)
    assert fresh.total()["never_flipped"] > monitor.total()["never_flipped"]


def test_load_state_dict_refuses_a_state_that_does_not_fit():
    model, opt, monitor = _make(False)
    _train(model, opt, monitor, 2)
    state = monitor.state_dict()
    with pytest.raises(ValueError, match="SAD's tracker|own tracker"):
        _make(True)[2].load_state_dict(state)
    other = torch.nn.Sequential(ovsw.OvSWConv2d(3, 4, 3))
    with pytest.raises(ValueError, match="other layers"):
        FlipMonitor(other, track_momentum=M, track_threshold=TAU).load_state_dict(state)
    with pytest.raises(ValueError, match="track_momentum"):
        FlipMonitor(model).load_state_dict(state)
    with pytest.raises(ValueError, match="not a FlipMonitor state_dict"):
        monitor.load_state_dict({"names": []})
    bad = dict(state, sign=[s[:1] for s in state["sign"]])
    before = monitor.state_dict()
    with pytest.raises(ValueError, match="sign of 2"):
        monitor.load_state_dict(bad)
    after = monitor.state_dict()  # nothing was half-loaded
    assert all(torch.equal(x, y) for x, y in zip(before["ever_flipped"], after["ever_flipped"]))


def test_histogram_counts_the_tracker_values():
    model, opt, monitor = _make(False)
    _train(model, opt, monitor, 4)
    hist = monitor.histogram()
    assert [h["name"] for h in hist] == ["2", "5"]
    for h, (_, tracker) in zip(hist, monitor.trackers()):
        v = tracker.double().flatten()
        edges = h["edges"]
        assert edges == list(ovsw.analysis.TRACKER_EDGES)
        assert sum(h["counts"]) == v.numel()  # every value lies in [0, 1]
        for k, c in enumerate(h["counts"]):
            lo, hi = edges[k], edges[k + 1]
            inside = (v >= lo) & ((v < hi) if k < len(edges) - 2 else (v <= hi))
            assert c == int(inside.sum())
        assert h["min"] == v.min().item() and h["max"] == v.max().item()
        assert h["sum"] == pytest.approx(v.sum().item())
        assert h["sum_squares"] == pytest.approx(v.square().sum().item())
    assert sum(hist[1]["counts"][1:]) > 0  # some weights flipped: not all in the zero bin
    with pytest.raises(ValueError, match="increasing"):
        monitor.histogram((0.0, 0.0))


def test_the_library_package_needs_neither_the_application_nor_matplotlib():
    code = (
        "import sys, ovsw.analysis\n"
        "print(' '.join(m for m in ('ovsw.train', 'matplotlib', 'yaml', 'tensorboard')"
        " if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == []
