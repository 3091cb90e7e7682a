"""torch.compile of ovsw models: ``torch.compile(model, fullgraph=True)`` traces the
binary layers (the ``torch.ops.ovsw`` custom ops) forward and backward without a graph
break, and ten training steps with the OvSW step outside the compiled region, or
compiled too (``torch.compile(opt.step)``), give the weights eager mode gives.

torch.optim's own step graph-breaks on purpose around its no-grad switch
(``torch/optim/optimizer.py``, ``_use_grad``), so no optimizer step compiles with
``fullgraph=True`` in torch 2.11; the test checks that those are the only breaks of a
compiled OvSW step and that AGS+SAD is inside a compiled graph.

A binary network is discontinuous (a sign flips when rounding moves an activation or a
weight across zero) and compiled kernels round differently from eager's (inductor's
fused BatchNorm, the compiled SGD update), so float32 trajectories part after a few
steps however correct both are. The comparison therefore runs inductor (the default
backend) in float64, where rounding stays ~1e-11 over ten steps, with the step outside
and inside; and, for the fused float32 CPU route of the core, the model compiled with
``aot_eager`` (the same tracing, fake implementations, autograd and functionalization,
eager kernels), which agrees with eager mode to the last bit.

CPU runs keep the models small (32x32 inputs, batch 4, 10 steps) so that the compile
time stays affordable; the ``cuda`` twin runs the same on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import ovsw
from ovsw.testing import rel_err, within

STEPS = 10
OPTIONS = dict(
    enable_ags=True, delta=0.01, enable_dampen=True, dampen_weight=2e-5, track_threshold=0.05
)


def _optimizer(model):
    sgd = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    return ovsw.OvSW(sgd, model, **OPTIONS)


def _batches(device, res, steps=STEPS, n=4):
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 3, res, res, generator=g).to(device),
            torch.randint(0, 10, (n,), generator=g).to(device),
        )
        for _ in range(steps)
    ]


def _train(model, forward, opt, step, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        step()
        losses.append(loss.item())
    return losses


def _assert_weights_close(model, ref, rtol):
    """Every float tensor of the state (weights, BN statistics, SAD state) within
    ``rtol`` of the largest magnitude of the eager one."""
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    worst = 0.0
    for k, v in ref_sd.items():
        if not v.is_floating_point():
            assert torch.equal(sd[k], v), k
            continue
        assert torch.isfinite(v).all(), f"{k}: the eager reference is not finite"
        err = rel_err(sd[k], v, floor=1e-12)
        assert within(err, rtol), (k, err)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_close_refuses_a_nonfinite_weight(bad):
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    model = copy.deepcopy(ref)
    assert _assert_weights_close(model, ref, 1e-6) == 0.0
    with torch.no_grad():
        model.weight[1, 2] = bad
    with pytest.raises(AssertionError):
        _assert_weights_close(model, ref, 1e-6)


# (backend, dtype, relative tolerance on every state tensor after ten steps)
SETTINGS = {
    "inductor-float64": ("inductor", torch.float64, 1e-8),
    "aot_eager-float32": ("aot_eager", torch.float32, 1e-6),
}


def _model(arch, device, dtype):
    torch.manual_seed(0)
    return ovsw.models.create(arch, num_classes=10).to(device, dtype)


def _check(arch, device, setting, step_inside):
    backend, dtype, rtol = SETTINGS[setting]
    ref = _model(arch, device, dtype)
    model = copy.deepcopy(ref)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    opt, ref_opt = _optimizer(model), _optimizer(ref)
    step = torch.compile(opt.step, backend=backend) if step_inside else opt.step
    batches = [(x.to(dtype), y) for x, y in _batches(device, RESOLUTION[arch])]
    losses = _train(model, compiled, opt, step, batches)
    ref_losses = _train(ref, ref, ref_opt, ref_opt.step, batches)
    torch.testing.assert_close(losses, ref_losses, rtol=rtol, atol=0)
    # The weights moved well beyond the tolerance (no vacuous comparison) ...
    start = _model(arch, device, dtype).state_dict()
    moved = max(
        rel_err(start[k], v, floor=1e-12)
        for k, v in ref.state_dict().items()
        if v.is_floating_point() and k in start
    )
    assert moved > 1e3 * rtol, moved
    # ... and agree within it.
    _assert_weights_close(model, ref, rtol)
    for s, r in zip(opt.stats(), ref_opt.stats()):
        assert s["name"] == r["name"]
        assert s["ags_ratio"] == pytest.approx(r["ags_ratio"], rel=rtol)
        assert s["silent_ratio"] == r["silent_ratio"]
    return step


ARCHS = ["cResNet20_1w1a", "ResNet18_1w1a"]
RESOLUTION = {"cResNet20_1w1a": 32, "ResNet18_1w1a": 16}  # ResNet18: 16 -> 1x1 at layer3


CASES = [
    ("inductor-float64", False),
    ("inductor-float64", True),
    ("aot_eager-float32", False),
]
IDS = ["inductor-float64-step_eager", "inductor-float64-step_compiled", "aot_eager-float32"]
# On the CPU (CI has two cores) ResNet18 runs the first case only: compiling its forward
# and backward with inductor is the costly part, and the others add nothing the smaller
# cResNet20 does not check. The cuda twin runs every case.
CPU_CASES = [("cResNet20_1w1a", case) for case in zip(CASES, IDS)] + [
    ("ResNet18_1w1a", (CASES[0], IDS[0]))
]


@pytest.mark.parametrize(
    "arch, setting, step_inside",
    [(arch, *case) for arch, (case, _) in CPU_CASES],
    ids=[f"{arch}-{i}" for arch, (_, i) in CPU_CASES],
)
@pytest.mark.slow
def test_compiled_training_matches_eager(arch, setting, step_inside):
    _check(arch, "cpu", setting, step_inside)


@pytest.mark.cuda
@pytest.mark.parametrize("setting, step_inside", CASES, ids=IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_matches_eager_cuda(arch, setting, step_inside):
    _check(arch, "cuda", setting, step_inside)


def test_a_compiled_step_breaks_only_where_torch_optim_does():
    """``torch.compile(opt.step)``: AGS+SAD is an op inside a compiled graph, and every
    graph break is one of torch.optim's own (``_use_grad`` in torch/optim/optimizer.py,
    which a plain SGD step has too: it cannot compile with ``fullgraph=True`` either)."""
    torch.manual_seed(0)
    model = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    opt = _optimizer(model)
    x, y = _batches("cpu", 32, steps=1)[0]
    F.cross_entropy(model(x), y).backward()
    explained = torch._dynamo.explain(opt.step)()
    ops = [
        n.target
        for g in explained.graphs
        for n in g.graph.nodes
        if n.op == "call_function" and "ovsw" in str(n.target)
    ]
    assert ops == [torch.ops.ovsw.ags_sad_step.default] or ops == [torch.ops.ovsw.ags_sad_step]
    assert explained.break_reasons, "torch.optim breaks on purpose; expected its breaks"
    for reason in explained.break_reasons:
        frames = [f.filename for f in reason.user_stack]
        assert frames and frames[-1].endswith("torch/optim/optimizer.py"), (
            reason.reason,
            frames,
        )
    sgd_model = torch.nn.Linear(3, 3)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1)
    sgd_model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(sgd.step, fullgraph=True)()


@pytest.mark.parametrize("arch", ARCHS)
def test_fullgraph_forward_and_backward_have_no_graph_break(arch):
    """The whole model is one graph: every binary layer is an op in it."""
    torch.manual_seed(0)
    model = ovsw.models.create(arch, num_classes=10)
    x, _ = _batches("cpu", RESOLUTION[arch], steps=1)[0]
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    convs = [
        n
        for n in explained.graphs[0].graph.nodes
        if n.op == "call_function" and "binary_conv2d" in str(n.target)
    ]
    assert len(convs) == len(ovsw.binary_convs(model))
