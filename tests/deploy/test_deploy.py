"""The deploy engine (issue 4): bit packing, exactness against model.eval() for all five
architectures, kernels, threads, bad files and bad inputs."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import ovsw
import ovsw.deploy as deploy
from conftest import engine_threads
from ovsw import _core, models, testing
from ovsw.deploy._bench import calibrated
from ovsw.testing import max_abs_err, rel_err_per_sample, within

ARCHS = [
    ("cResNet20_1w1a", 32),
    ("cResNet18_1w1a", 32),
    ("VGGSmall_1w1a", 32),
    ("ResNet18_1w1a", 64),
    ("ResNet34_1w1a", 64),
]
REL = 1e-4


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest per-sample |y - ref| over the largest |ref| of that sample (``inf`` for a
    sample with a NaN or inf where a number was expected)."""
    return float(rel_err_per_sample(y, ref).max())


def differing_samples(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Indices of the samples not within relative :data:`REL` of ``ref`` (NaN and inf
    included)."""
    return np.flatnonzero([not within(e, REL) for e in rel_err_per_sample(y, ref)])


def logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def torch_tensors(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """(input, output) of every module call of model.eval() on ``x``, by module name."""
    seen: dict[str, list] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: seen.setdefault(name, []).append((inp[0], out))
        )
        for name, m in model.named_modules()
        if name
    ]
    logits(model, x)
    for h in hooks:
        h.remove()
    return seen


def anchor_tensor(seen: dict, arch: str, op_name: str) -> torch.Tensor:
    """PyTorch's tensor for the output of engine op ``op_name`` (NCHW)."""
    module, which, index = anchor(arch, op_name)
    inp, out = seen[module][index]
    t = (inp if which == "input" else out).detach()
    return t.reshape(t.shape[0], -1, 1, 1) if t.dim() == 2 else t


def as_nchw(y: np.ndarray) -> np.ndarray:
    return y.reshape(*y.shape, 1, 1) if y.ndim == 2 else y


def explain_difference(engine, model: nn.Module, x: torch.Tensor, i: int, arch: str) -> str:
    """Runs the engine op by op on sample ``i`` of ``x`` next to PyTorch on the whole
    batch (whose rounding depends on the batch) and asserts that the first op whose
    output departs from PyTorch's is a binary conv whose input agrees with PyTorch's to
    float rounding but holds a value within 1e-5 of zero that the two binarize to
    opposite signs. Returns that op's name."""
    seen = torch_tensors(model, x)
    x1 = x[i : i + 1].numpy()
    ours = {0: x1}
    theirs = {0: x1}
    for op in engine.graph:
        res = ours[op["residual"]] if op.get("residual") is not None else None
        got = as_nchw(engine.run_op(op["name"], ours[op["x"]], res))
        want = anchor_tensor(seen, arch, op["name"])[i : i + 1].numpy()
        if not within(testing.rel_err(got, want), REL):
            assert np.isfinite(got).all(), f"{op['name']}: NaN or inf in the engine's output"
            assert op["op"] == "bconv2d", f"first difference at {op['name']} ({op['op']})"
            a, b = ours[op["x"]], theirs[op["x"]]
            assert within(max_abs_err(a, b), 1e-5), f"{op['name']}: inputs differ beyond rounding"
            flipped = np.sign(a) != np.sign(b)
            assert flipped.any(), f"{op['name']}: outputs differ with identical input signs"
            assert within(max_abs_err(b[flipped], np.zeros(flipped.sum())), 1e-5)
            return op["name"]
        ours[op["y"]] = got
        theirs[op["y"]] = want
    raise AssertionError("no op differs, yet the logits do")


def check_logits(engine, model: nn.Module, x: torch.Tensor, arch: str) -> None:
    """Engine logits equal model.eval()'s within relative 1e-4, sample by sample.

    A deep binary network amplifies a sign flip: a value that float rounding leaves
    within ~1e-7 of zero may binarize to +1 on one side and -1 on the other, and the
    logits then differ for real (at most 1 image of 48 to 512 by network, as
    `python benchmarks/deploy_agreement.py` counts them; see the README). A sample
    may differ only if :func:`explain_difference` traces it to such a flip; most
    samples must match outright.
    """
    ref = logits(model, x)
    y = engine(x.numpy())
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.isfinite(ref).all(), "PyTorch's own logits are not finite"
    bad = differing_samples(y, ref)
    for i in bad:
        explain_difference(engine, model, x, int(i), arch)
    per_sample = rel_err_per_sample(y, ref)
    assert len(bad) <= len(x) // 4, f"{len(bad)} of {len(x)} samples differ: {per_sample}"


def roundtrip(model, tmp_path, size, **load_kw):
    path = deploy.export(model.eval(), tmp_path / "m.ovsw", input_size=size)
    return deploy.load(path, threads=engine_threads(), **load_kw)


# -- packing --------------------------------------------------------------------------


def test_pack_signs_matches_a_bit_by_bit_reference():
    torch.manual_seed(0)
    w = torch.randn(5, 70, 3, 2)  # 70 channels: one full word and one partial
    w[1, 3, 0, 0] = 0.0
    w[2, 64, 2, 1] = -0.0
    bits, mask = deploy.pack_signs(w)
    assert bits.dtype == np.uint64 and bits.shape == (5, 3, 2, 2)
    for o in range(5):
        for ky in range(3):
            for kx in range(2):
                for j in range(2):
                    want = sum(
                        1 << (c - 64 * j)
                        for c in range(64 * j, min(70, 64 * j + 64))
                        if float(w[o, c, ky, kx]) < 0
                    )
                    nonzero = sum(
                        1 << (c - 64 * j)
                        for c in range(64 * j, min(70, 64 * j + 64))
                        if float(w[o, c, ky, kx]) != 0
                    )
                    assert int(bits[o, ky, kx, j]) == want
                    assert int(mask[o, ky, kx, j]) == nonzero
    assert deploy.pack_signs(torch.randn(2, 8, 1, 1))[1] is None


def test_binary_weights_take_one_bit_each(tmp_path):
    model = models.create("ResNet18_1w1a").eval()
    path = deploy.export(model, tmp_path / "r18.ovsw")
    raw = path.read_bytes()
    header = json.loads(raw[32 : 32 + struct.unpack("<Q", raw[16:24])[0]])
    convs = dict(ovsw.binary_convs(model))
    bconvs = [op for op in header["ops"] if op["op"] == "bconv2d"]
    assert len(bconvs) == len(convs) == 16
    for op in bconvs:
        conv = convs[op["name"]]
        words = -(-conv.in_channels // 64)
        o, kh, kw = conv.out_channels, *conv.kernel_size
        assert header["tensors"][op["weight"]]["nbytes"] == o * kh * kw * words * 8
        assert op["weight_mask"] is None


# -- exactness ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch,size", ARCHS)
def test_random_init_matches_eval(arch, size, tmp_path):
    torch.manual_seed(0)
    model = models.create(arch).eval()
    engine = roundtrip(model, tmp_path, size)
    check_logits(engine, model, torch.randn(8, 3, size, size), arch)


@pytest.mark.parametrize("arch,size", ARCHS)
def test_trained_like_batchnorm_matches_eval(arch, size, tmp_path):
    # Random init leaves ResNet BatchNorm weights at 1e-8, which hides the binary
    # layers; trained-like statistics make every layer count.
    model = calibrated(arch, size)
    engine = roundtrip(model, tmp_path, size)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    check_logits(engine, model, x, arch)


TRAIN_VARIANTS = [
    ("cResNet20_1w1a", 32, {}),
    ("cResNet18_1w1a", 32, {"scaling_factor": True}),
    ("VGGSmall_1w1a", 32, {"act_w": "ste_v2"}),
    ("ResNet18_1w1a", 64, {"scaling_factor": True, "act_w": "hardtanh"}),
    ("ResNet34_1w1a", 64, {"act_w": "hardtanhv2"}),
]


@pytest.mark.parametrize("arch,size,options", TRAIN_VARIANTS)
def test_after_training_steps_matches_eval(arch, size, options, tmp_path):
    torch.manual_seed(0)
    model = models.create(arch, **options)
    for m in model.modules():  # move BatchNorm away from its init so it matters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    opt = ovsw.OvSW(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        enable_ags=True,
        delta=0.04,
        enable_dampen=True,
        dampen_weight=1e-3,
    )
    model.train()
    for _ in range(3):
        x = torch.randn(4, 3, size, size)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    engine = roundtrip(model, tmp_path, size)
    check_logits(engine, model, torch.randn(8, 3, size, size), arch)


#: Every kernel name and the CPU flags it needs (as /proc/cpuinfo names them).
DISABLE_ENV = "OVSW_DISABLE_CPU_FEATURES"
KERNEL_FLAGS = {
    "avx512_vpopcntdq": ("avx512f", "avx512_vpopcntdq"),
    "avx512bw": ("avx512f", "avx512bw"),
    "avx2": ("avx2",),
    "popcnt": ("popcnt",),
    "portable": (),
}


def test_kernels_lists_what_this_cpu_runs():
    kernels = deploy.kernels()
    flags = deploy.cpu_flags()
    assert kernels[-1] == "portable"
    assert kernels == [k for k in KERNEL_FLAGS if set(KERNEL_FLAGS[k]) <= set(flags)]


@pytest.mark.parametrize("arch,size", ARCHS)
def test_every_kernel_gives_bit_identical_logits(arch, size, tmp_path):
    model = calibrated(arch, size)
    # Exact zeros in one binary conv's weights: that layer runs the masked kernel.
    name, conv = next(iter(ovsw.binary_convs(model)))
    with torch.no_grad():
        conv.weight[0, :, 0, 0] = 0.0
    path = deploy.export(model, tmp_path / "m.ovsw", input_size=size)
    x = np.random.default_rng(0).standard_normal((3, 3, size, size), dtype=np.float32)
    outs = {k: deploy.load(path, threads=engine_threads(), kernel=k)(x) for k in deploy.kernels()}
    for k, y in outs.items():
        np.testing.assert_array_equal(y, outs["portable"], err_msg=f"{k} ({name} masked)")
    assert deploy.load(path).kernel == deploy.kernels()[0]


def with_hidden_flags(*flags: str) -> dict[str, str]:
    """The environment with ``flags`` hidden in addition to what OVSW_DISABLE_CPU_FEATURES
    already hides: a run that simulates a smaller CPU (CI's AVX2 run) stays simulated."""
    outer = os.environ.get(DISABLE_ENV, "").replace(",", " ").split()
    return {**os.environ, DISABLE_ENV: " ".join(dict.fromkeys([*outer, *flags]))}


def refusal(kernel: str, usable: list[str]) -> str:
    """The pattern of the refusal of ``kernel`` where ``usable`` are the CPU's flags left
    after OVSW_DISABLE_CPU_FEATURES: it names the kernel's first missing flag, as one the
    CPU lacks or as one the variable hides."""
    missing = [f for f in KERNEL_FLAGS[kernel] if f not in usable]
    assert missing, f"{kernel} is runnable with {usable}"
    flag = re.escape(missing[0])
    return f"(lacks the {flag} flag|needs the CPU flag {flag}, which {DISABLE_ENV} hides)"


def best_kernel(usable: list[str]) -> str:
    return next(k for k, need in KERNEL_FLAGS.items() if set(need) <= set(usable))


@pytest.mark.parametrize("kernel", list(KERNEL_FLAGS))
def test_a_kernel_this_cpu_lacks_is_refused_naming_the_flag(kernel, good_file):
    if kernel in deploy.kernels():
        assert deploy.load(good_file, kernel=kernel).kernel == kernel
        return
    # The CPU lacks the flag, or OVSW_DISABLE_CPU_FEATURES hides it (as when the suite
    # runs as an AVX2 CPU would); either way the message names it.
    with pytest.raises(ValueError, match=refusal(kernel, deploy.cpu_flags())):
        deploy.load(good_file, kernel=kernel)


def test_refusal_names_the_first_missing_flag():
    # The pattern itself, on both kinds of CPU: an AVX2-only one lacks avx512f; an
    # AVX-512 one whose vpopcntdq is hidden names that flag.
    avx2 = ["popcnt", "avx2"]
    assert re.search(
        refusal("avx512_vpopcntdq", avx2),
        "this CPU cannot run the 'avx512_vpopcntdq' kernel: it lacks the avx512f flag",
    )
    assert not re.search(refusal("avx512_vpopcntdq", avx2), "it lacks the avx512_vpopcntdq flag")
    zen5 = ["popcnt", "avx2", "avx512f", "avx512bw"]
    hidden = (
        "the 'avx512_vpopcntdq' kernel needs the CPU flag avx512_vpopcntdq, "
        f"which {DISABLE_ENV} hides"
    )
    assert re.search(refusal("avx512_vpopcntdq", zen5), hidden)
    assert best_kernel(zen5) == "avx512bw" and best_kernel(avx2) == "avx2"
    assert best_kernel([]) == "portable"


def test_hidden_cpu_flags_make_a_kernel_unreachable(good_file):
    # OVSW_DISABLE_CPU_FEATURES takes flags away (it cannot add any), so this works on
    # every CPU, and on top of what the environment already hides: the kernels that
    # need a hidden flag are neither listed nor loadable.
    script = f"""
import json
import ovsw.deploy as d
assert "avx512_vpopcntdq" not in d.kernels() and "avx2" not in d.kernels(), d.kernels()
assert "avx2" not in d.cpu_flags()
print(json.dumps(d.cpu_flags()))
for k in ("avx512_vpopcntdq", "avx2"):
    try:
        d.load({str(good_file)!r}, kernel=k)
    except ValueError as e:
        print(e)
    else:
        raise SystemExit(k + " loaded")
e = d.load({str(good_file)!r})
print("auto:", e.kernel)
"""
    env = with_hidden_flags("avx512_vpopcntdq", "avx2")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    usable = json.loads(lines[0])
    # What the outer environment hides stays hidden in the child.
    assert set(usable) <= set(deploy.cpu_flags()), (usable, deploy.cpu_flags())
    assert re.search(refusal("avx512_vpopcntdq", usable), lines[1]), lines
    assert re.search(refusal("avx2", usable), lines[2]), lines
    assert lines[3] == f"auto: {best_kernel(usable)}", lines
    assert lines[3] in ("auto: avx512bw", "auto: popcnt", "auto: portable"), lines
    bad = with_hidden_flags("avx9")
    proc = subprocess.run(
        [sys.executable, "-c", "import ovsw.deploy as d; d.kernels()"],
        capture_output=True,
        text=True,
        timeout=120,
        env=bad,
    )
    assert proc.returncode != 0 and "unknown CPU flag 'avx9'" in proc.stderr


def test_zero_activations_and_zero_weights_count_as_zero(tmp_path):
    # sign(0) == 0: zero activations (here whole stem channels) and zero weights must
    # contribute nothing, which the engine handles with its masked kernel.
    model = calibrated("cResNet20_1w1a", 32)
    with torch.no_grad():
        model.bn1.weight[:5] = 0.0
        model.bn1.bias[:5] = 0.0
        w = model.layer1[0].conv1.weight
        w[:, :3] = 0.0
        model.layer2[0].conv2.weight[0, :, 1, 1] = 0.0
    engine = roundtrip(model, tmp_path, 32)
    x = torch.randn(4, 3, 32, 32)
    check_logits(engine, model, x, "cResNet20_1w1a")
    # the same network with those zeros treated as +1 would differ clearly
    with torch.no_grad():
        model.layer1[0].conv1.weight[:, :3] = 1e-3
    assert rel_err(engine(x.numpy()), logits(model, x)) > 1e-3


def binary_mobilenet_v2() -> nn.Module:
    """torchvision's mobilenet_v2 (10 classes, random init) through
    ``ovsw.binarize(linear=True)``, BatchNorm given trained-like statistics, in eval mode
    (the bench's model): 17 depthwise binary convs, one channel per group."""
    pytest.importorskip("torchvision")
    from ovsw.deploy._bench import converted

    return converted("mobilenet_v2")


def test_binarized_mobilenet_v2_matches_eval(tmp_path):
    # Depthwise convs run on the engine's grouped route (i8 signs, not bit packing):
    # logits within REL of PyTorch's, sample by sample, identical on every kernel.
    model = binary_mobilenet_v2()
    depthwise = [n for n, m in ovsw.binary_convs(model) if m.groups == m.in_channels > 1]
    assert len(depthwise) == 17
    path = deploy.export(model, tmp_path / "m.ovsw", input_size=32)
    engine = deploy.load(path, threads=engine_threads())
    ops = dict(engine._engine.ops)
    assert all(ops[n] == "bconv2d" for n in depthwise)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    y = engine(x.numpy())
    per_sample = rel_err_per_sample(y, logits(model, x))
    assert all(within(e, REL) for e in per_sample), per_sample
    for k in deploy.kernels():
        np.testing.assert_array_equal(deploy.load(path, kernel=k)(x.numpy()), y, err_msg=k)
    # The check sees a wrong depthwise conv: one channel's weight negated in PyTorch.
    with torch.no_grad():
        model.get_submodule(depthwise[3]).weight[5].neg_()
    assert rel_err(y, logits(model, x)) > 1e-3


def test_threads_do_not_change_results(tmp_path):
    model = calibrated("VGGSmall_1w1a", 32)
    path = deploy.export(model, tmp_path / "v.ovsw")
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    one = deploy.load(path, threads=1)
    y1 = one(x)
    one.threads = engine_threads()
    assert one.threads == engine_threads()
    np.testing.assert_array_equal(one(x), y1)
    with pytest.raises(ValueError, match="threads"):
        one.threads = 0
    with pytest.raises(ValueError, match="threads"):
        deploy.load(path, threads=-1)


def test_threads_above_the_cpus_this_process_may_use_are_refused(tmp_path):
    # One check, in the engine: load, the setter and both command lines get it.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    allowed = _core.deploy_threads()
    if cpus is not None:
        assert allowed <= cpus  # a cgroup CPU quota may lower it, never raise it
    model = models.create("cResNet20_1w1a", num_classes=3).eval()
    path = deploy.export(model, tmp_path / "m.ovsw")
    too_many = f"threads={allowed + 1} exceeds the {allowed} CPUs this process may use"
    with pytest.raises(ValueError, match=too_many):
        deploy.load(path, threads=allowed + 1)
    with pytest.raises(ValueError, match="threads=10000 exceeds the"):
        deploy.load(path, threads=10000)
    engine = deploy.load(path)  # the default: every CPU this process may use
    assert engine.threads == allowed
    engine.threads = 1
    with pytest.raises(ValueError, match=too_many):
        engine.threads = allowed + 1
    assert engine.threads == 1  # a refused count leaves the pool as it was
    with pytest.raises(ValueError, match="positive integer"):
        engine.threads = 2.0
    for argv in (
        ["-m", "ovsw.deploy", "bench", "--threads", "1", "10000"],
        ["-m", "ovsw.train.export", str(tmp_path), "--threads", "10000"],
    ):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert "threads=10000 exceeds the" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_names_every_op(tmp_path):
    model = calibrated("cResNet20_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32), dtype=np.float32)
    y, times = engine.profile(x)
    np.testing.assert_array_equal(y, engine(x))
    assert [(t.name, t.op) for t in times] == engine.ops
    assert all(t.seconds >= 0 for t in times)
    first = times[0]
    assert first.op == "conv2d" and first.shape == (1, 16, 32, 32)
    _, raw = engine._engine.profile(x)  # the compiled module's answer, as the stub says
    assert isinstance(raw[0][2], tuple) and raw[0][2] == (1, 16, 32, 32)
    assert sum(t.op == "bconv2d" for t in times) == 18
    assert "cResNet20" not in engine.summary() or "CifarResNetA" in engine.summary()
    assert engine.metadata["arch"] == "CifarResNetA"


def test_non_contiguous_input(tmp_path):
    model = calibrated("cResNet20_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    x = np.random.default_rng(4).standard_normal((3, 32, 32, 2), dtype=np.float32)
    x = x.transpose(3, 0, 1, 2)  # (2, 3, 32, 32), not C-contiguous
    assert not x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(engine(x), engine(np.ascontiguousarray(x)))


# -- export -----------------------------------------------------------------------------


def test_export_metadata_and_atomic_write(tmp_path):
    model = models.create("cResNet18_1w1a", num_classes=7).eval()
    target = tmp_path / "m.ovsw"
    target.write_bytes(b"old contents")
    deploy.export(model, target, metadata={"run": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ovsw"]
    engine = deploy.load(target)
    meta = engine.metadata
    assert meta["format"] == "ovsw-deploy" and meta["version"] == deploy.FORMAT_VERSION
    assert meta["arch"] == "CifarResNetB" and meta["num_classes"] == 7
    assert meta["input"] == {"channels": 3, "height": 32, "width": 32}
    assert meta["user"] == {"run": "abc"}


def test_export_write_errors_are_os_errors_and_leave_nothing(tmp_path):
    # the engine writes the file (a temporary file beside it, renamed into place)
    model = models.create("cResNet20_1w1a", num_classes=3).eval()
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        deploy.export(model, tmp_path / "no-such-folder" / "m.ovsw")
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "m.ovsw"
    deploy.export(model, target, metadata={"note": "caf\u00e9 \u2713", "ok": [1.5, None]})
    assert deploy.load(target).metadata["user"] == {"note": "caf\u00e9 \u2713", "ok": [1.5, None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ovsw"]


@pytest.mark.parametrize("size", [(3, 64, 64), "64", -1, 0, True, 32.0, (32, 0), (32,), [True, 8]])
def test_export_refuses_a_malformed_input_size(size, tmp_path):
    model = models.create("cResNet20_1w1a", num_classes=3).eval()
    want = "input_size must be a positive int or a (height, width) pair of positive ints, got "
    with pytest.raises(ValueError, match=re.escape(want + repr(size)) + "$"):
        deploy.export(model, tmp_path / "m.ovsw", input_size=size)
    assert not list(tmp_path.iterdir())
    meta = deploy.load(deploy.export(model, tmp_path / "m.ovsw", input_size=[24, np.int64(40)]))
    assert meta.metadata["input"] == {"channels": 3, "height": 24, "width": 40}


def test_export_refuses_training_mode_and_unknown_models(tmp_path):
    with pytest.raises(ValueError, match="eval"):
        deploy.export(models.create("cResNet20_1w1a"), tmp_path / "a.ovsw")
    with pytest.raises(TypeError, match="no deploy lowering for Sequential"):
        deploy.export(nn.Sequential(nn.Linear(2, 2)).eval(), tmp_path / "b.ovsw")
    assert not list(tmp_path.iterdir())


def test_export_unwraps_module_wrappers(tmp_path):
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like to export
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = calibrated("cResNet20_1w1a", 32)
    engine = roundtrip(Wrapper(model), tmp_path, 32)
    check_logits(engine, model, torch.randn(4, 3, 32, 32), "cResNet20_1w1a")


# -- bad files and bad inputs -----------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("deploy") / "c20.ovsw"
    deploy.export(models.create("cResNet20_1w1a").eval(), path)
    return path


def rewrite(raw: bytes, tmp_path, mutate) -> str:
    buf = bytearray(raw)
    mutate(buf)
    path = tmp_path / "bad.ovsw"
    path.write_bytes(bytes(buf))
    return path


def with_crc(buf: bytearray) -> None:
    buf[-4:] = struct.pack("<I", zlib.crc32(bytes(buf[:-4])) & 0xFFFFFFFF)


def test_corrupt_byte_is_a_checksum_error(good_file, tmp_path):
    raw = good_file.read_bytes()

    def flip(buf):
        buf[len(buf) // 2] ^= 0x40

    with pytest.raises(ValueError, match="checksum mismatch"):
        deploy.load(rewrite(raw, tmp_path, flip))


@pytest.mark.parametrize("keep", [0, 10, 40, 1000, -1])
def test_truncated_file(good_file, tmp_path, keep):
    raw = good_file.read_bytes()
    path = tmp_path / "short.ovsw"
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(ValueError, match="truncated|shorter|magic") as err:
        deploy.load(path)
    assert str(path) in str(err.value)


def test_bad_magic_and_future_version(good_file, tmp_path):
    raw = good_file.read_bytes()

    def magic(buf):
        buf[:8] = b"PK\x03\x04xxxx"

    with pytest.raises(ValueError, match="not an ovsw deploy file"):
        deploy.load(rewrite(raw, tmp_path, magic))

    def future(buf):
        buf[8:12] = struct.pack("<I", 99)
        with_crc(buf)

    with pytest.raises(ValueError, match="version 99 is not supported"):
        deploy.load(rewrite(raw, tmp_path, future))


def test_inconsistent_header_is_refused(good_file, tmp_path):
    raw = good_file.read_bytes()
    hlen = struct.unpack("<Q", raw[16:24])[0]
    header = json.loads(raw[32 : 32 + hlen])
    header["ops"][3]["in_channels"] = 999  # no longer fits its weight tensor
    head = json.dumps(header).encode()
    data_start = -(-(32 + hlen) // 64) * 64
    data = raw[data_start:-4]
    buf = bytearray(raw[:8]) + struct.pack("<IIQQ", 1, 0, len(head), len(data)) + head
    buf += b"\0" * (-len(buf) % 64) + data + b"\0\0\0\0"
    with_crc(buf)
    path = tmp_path / "inconsistent.ovsw"
    path.write_bytes(bytes(buf))
    with pytest.raises(
        ValueError,
        match=r"corrupt deploy file: op 'layer1.1.conv1': tensor 'weight' must be u64 "
        r"of shape \[16, 3, 3, 16\]",
    ):
        deploy.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        deploy.load(tmp_path / "nope.ovsw")


def test_bad_inputs(good_file):
    engine = deploy.load(good_file)
    with pytest.raises(TypeError, match="float32"):
        engine(np.zeros((1, 3, 32, 32), dtype=np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        engine([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        engine(np.zeros((3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="expects 3 input channels"):
        engine(np.zeros((1, 4, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="empty input"):
        engine(np.zeros((0, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="kernel"):
        deploy.load(good_file, kernel="avx9000")


def test_wrong_input_size_for_a_fixed_size_head(tmp_path):
    # VGGSmall flattens its last feature map into the head: one input size only, and
    # another is refused before any op runs, naming both sizes and the layer.
    engine = roundtrip(models.create("VGGSmall_1w1a"), tmp_path, 32)
    assert not engine.accepts_any_size
    assert "input 3x32x32 (this size only)" in engine.summary().splitlines()[0]
    with pytest.raises(
        ValueError,
        match=r"^this network takes 3x32x32 inputs \(the size it was exported for\); got "
        r"3x16x16 \(layer 'fc' expects 8192 features, got 2048",
    ):
        engine(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"got 3x1x1 \(input of 1x1 is too small for .*'pooling1'"):
        engine(np.zeros((1, 3, 1, 1), dtype=np.float32))
    # 33x33 pools down to the same 4x4 map: PyTorch takes it, and so does the engine
    assert engine(np.zeros((1, 3, 33, 33), dtype=np.float32)).shape == (1, 10)


def test_a_global_pool_head_takes_any_input_size(tmp_path):
    model = calibrated("cResNet20_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    assert engine.accepts_any_size and engine._engine.accepts_any_size
    assert "input 3x32x32 (any size accepted)" in engine.summary().splitlines()[0]
    for h, w in [(40, 24), (16, 48)]:
        x = torch.randn(4, 3, h, w, generator=torch.Generator().manual_seed(h))
        check_logits(engine, model, x, "cResNet20_1w1a")
    # An odd width: the stride-2 conv rounds up where the shortcut's pooling rounds
    # down (PyTorch fails there too, adding the two); refused up front, naming the layer.
    with pytest.raises(
        ValueError,
        match=r"^layer 'layer2.0.conv1': residual of 32x16x8 does not match its output of 32x16x9$",
    ):
        engine(np.zeros((1, 3, 32, 17), dtype=np.float32))
    # too small for the stride-2 shortcut's pooling: refused up front, naming the layer
    with pytest.raises(
        ValueError, match=r"^input of 1x1 is too small for pooling layer 'layer2.0.shortcut.pool'"
    ):
        engine(np.zeros((1, 3, 1, 1), dtype=np.float32))


# -- command line -----------------------------------------------------------------------


def test_module_without_command_prints_usage():
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.deploy"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.slow
def test_bench_command_prints_its_json_summary():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ovsw.deploy",
            "bench",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--model-repeats",
            "1",
            "--batches",
            "1",
            "2",
            "--batch-repeats",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    # The machine: CPU model, the flags found, the kernels it runs and the one measured.
    assert summary["cpu"] and summary["cpu"] in lines[0]
    assert summary["cpu_flags"] == deploy.cpu_flags()
    assert summary["kernels"] == deploy.kernels()
    assert summary["kernel"] == deploy.kernels()[0]
    assert f"measured: {summary['kernel']}" in lines[1]
    rows = summary["throughput"]
    assert {(r["arch"], r["batch"]) for r in rows} == {
        (a, b) for a in ("ResNet18_1w1a", "cResNet20_1w1a", "VGGSmall_1w1a") for b in (1, 2)
    }
    assert all(r["engine_images_s"] > 0 and r["torch_images_s"] > 0 for r in rows)
    assert isinstance(summary["throughput_ratio_min"], float)
    assert any(line.startswith("Throughput, images/s") for line in lines)
    for key in (
        "binary3x3_speedup_min",
        "binary3x3_speedup_median",
        "model_speedup",
        "max_rel_err",
        "size_ratio",
    ):
        assert isinstance(summary[key], float), key
    assert 0 < summary["size_ratio"] < 0.2
    assert any("64->64 56x56 s1" in line for line in lines)
    # torchvision models through ovsw.binarize, against their own eval mode.
    conv = summary["converted"]
    assert [(r["model"], r["input"], r["batch"]) for r in conv] == [
        ("mobilenet_v2", 64, 4),
        ("resnet18", 64, 4),
    ]
    assert all(r["engine_ms"] > 0 and r["torch_ovsw_ms"] > 0 for r in conv)
    assert any(line.startswith("Converted torchvision models") for line in lines)
    # The stem's share of each model's engine time, as `profile` reports it.
    shares = summary["stem_share"]
    assert {r["arch"] for r in shares} == {"ResNet18_1w1a", "cResNet20_1w1a", "VGGSmall_1w1a"}
    assert all(0 < r["share"] < 1 for r in shares), shares
    assert any(line.startswith("Stem share of the engine's time") for line in lines)


def test_bench_scaling_ratios_pair_the_right_measurements():
    from ovsw.deploy._bench import scaling_rows

    rows = [
        {"arch": "A", "threads": t, "batch": b, "engine_images_s": v}
        for t, b, v in [(1, 8, 100.0), (1, 64, 80.0), (2, 8, 150.0), (2, 64, 180.0), (2, 1, 9.0)]
    ]
    got = {(r["what"], r["threads"], r["batch"]): r["ratio"] for r in scaling_rows(rows)}
    # No 1-thread batch-1 row: no t2/t1 at batch 1.
    assert got == {
        ("b64/b8", 1, 64): 0.8,
        ("b64/b8", 2, 64): 1.2,
        ("t2/t1", 2, 8): 1.5,
        ("t2/t1", 2, 64): 2.25,
    }


# -- every op against the layers it came from, on the same input --------------------------


def anchor(arch: str, name: str) -> tuple[str, str, int]:
    """(module, "input" | "output", call index) whose tensor equals op ``name``'s
    output, from the architecture files' structure (independently of the exporter)."""
    vgg = arch.startswith("VGG")
    if name == "avg_pool2d":  # functional global pool of cResNet20: bn2's input
        return ("bn2", "input", 0)
    if name == "flatten":
        return ("fc", "input", 0)
    block = re.fullmatch(r"(layer\d\.\d+)\.conv([12])", name)
    if block:
        return (f"{block[1]}.act{block[2]}", "output", 0)
    if name.endswith((".shortcut.0", ".downsample.0")):
        return (name[:-2], "output", 0)
    if vgg and name.startswith("pooling"):
        return ("pooling", "output", {"1": 0, "3": 1, "5": 2}[name[-1]])
    if vgg and name.startswith("conv") and name != "conv0":
        return (f"nonlinear{name[-1]}" if name[-1] in "24" else name, "output", 0)
    if vgg and name.startswith("bn") and name != "bn2":
        return (f"nonlinear{name[-1]}", "output", 0)
    if name in ("conv0", "conv1"):
        stem = {"cResNet20": "act", "cResNet18": "bn1", "VGGSmall": "nonlinear0"}
        return (stem.get(arch.split("_")[0], "act"), "output", 0)
    return (name, "output", 0)


@pytest.mark.parametrize("arch,size", ARCHS)
def test_every_op_matches_its_layers_on_the_same_input(arch, size, tmp_path):
    # Fed the very tensors PyTorch computed, each op must reproduce the next one: the
    # binary ops binarize identical floats, so only float rounding may differ.
    model = calibrated(arch, size)
    engine = roundtrip(model, tmp_path, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    seen = torch_tensors(model, x)
    produced = {0: x}
    checked = 0
    for op in engine.graph:
        src = produced[op["x"]]
        res = produced[op["residual"]] if op.get("residual") is not None else None
        want = anchor_tensor(seen, arch, op["name"])
        got = engine.run_op(op["name"], src.numpy(), None if res is None else res.numpy())
        want_np = want.numpy().reshape(got.shape)
        err = testing.rel_err(got, want_np, floor=1e-12)
        assert within(err, REL), f"{op['name']} ({op['op']}): relative error {err:.2e}"
        produced[op["y"]] = want
        checked += 1
    assert checked == len(engine.ops)


@pytest.mark.slow
def test_export_a_training_run_and_score_it(tmp_path, capsys):
    from ovsw.train import cli
    from ovsw.train.export import export_run

    logs = tmp_path / "runs"
    config = "configs/smallscale/w1a1-ovsw-resnet20-digits.yaml"
    assert cli.main(["--config", config, "--epochs", "1", "--log-dir", str(logs),
                     "--batch-size", "16", "--limit-batches", "4", "-p", "1",
                     "--scaling_factor", "True"]) == 0  # fmt: skip
    run_dir = logs / "w1a1-ovsw-resnet20-digits" / "default"
    result = export_run(run_dir, threads=engine_threads())
    out = capsys.readouterr().out
    assert (run_dir / "model_best.ovsw").is_file()
    assert result["samples"] == 359  # the digits validation split
    assert abs(result["top1_engine"] - result["top1_torch"]) <= 100.0 / 359
    assert result["agreement"] >= 99.0
    assert "validation (Digits, 359 images)" in out
    meta = deploy.load(run_dir / "model_best.ovsw").metadata
    assert meta["arch"] == "CifarResNetA" and meta["user"]["set"] == "Digits"
    assert meta["user"]["epoch"] == 1
    # the command-line form, and its error for a folder that is not a run
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.train.export", str(run_dir), "-o",
         str(tmp_path / "m.ovsw"), "--no-check"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.ovsw").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.train.export", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "not an ovsw-train run folder" in proc.stderr


def test_the_old_export_command_names_the_new_one():
    # the run-folder export moved into the application (ovsw-export); the library's
    # command line says so in one line instead of failing with a traceback
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.deploy", "export", "runs/x"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "ovsw-export RUN_DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_a_differing_sample_is_traced_to_a_rounding_level_sign_flip(tmp_path):
    # Search random images until one differs (1 of 512 for cResNet18 at 32x32 in
    # benchmarks/deploy_agreement.py; up to 640 images are tried here),
    # and check that the tracer pins it on a near-zero value binarized both ways.
    model = calibrated("cResNet18_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    gen = torch.Generator().manual_seed(7)
    for _ in range(40):
        x = torch.randn(16, 3, 32, 32, generator=gen)
        bad = differing_samples(engine(x.numpy()), logits(model, x))
        if bad.size:
            name = explain_difference(engine, model, x, int(bad[0]), "cResNet18_1w1a")
            assert name.startswith("layer")
            return
    pytest.fail("no differing image among 640; the flip rate is lower than measured")


class Poisoned:
    """An engine whose logits carry a NaN in sample 0 and, if ``op`` is given, whose
    ``run_op(op)`` output carries one too; everything else is the real engine's."""

    def __init__(self, engine, op: str | None = None):
        self.engine, self.graph, self.op = engine, engine.graph, op

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.engine(x).copy()
        y[0, 1] = np.nan
        return y

    def run_op(self, name, x, residual):
        y = self.engine.run_op(name, x, residual)
        if name == self.op:
            y = y.copy()
            y.flat[y.size // 2] = np.nan
        return y


@pytest.mark.slow
def test_a_nan_from_the_engine_fails_the_logit_checks(tmp_path):
    # NaN >= REL is False: the per-sample check must still count such a sample as
    # differing, and the tracer must not pass it off as a sign flip.
    model = calibrated("cResNet20_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    check_logits(engine, model, x, "cResNet20_1w1a")  # the engine itself passes
    ref = logits(model, x)
    assert rel_err(Poisoned(engine)(x.numpy()), ref) == np.inf
    assert list(differing_samples(Poisoned(engine)(x.numpy()), ref)) == [0]
    with pytest.raises(AssertionError, match="no op differs"):
        check_logits(Poisoned(engine), model, x, "cResNet20_1w1a")
    with pytest.raises(AssertionError, match="layer2.0.conv1: NaN or inf"):
        check_logits(Poisoned(engine, "layer2.0.conv1"), model, x, "cResNet20_1w1a")


FUZZ = r"""
import json, struct, sys, zlib
import numpy as np
import ovsw.deploy as deploy

raw = open(sys.argv[1], "rb").read()
hlen = struct.unpack("<Q", raw[16:24])[0]
header = json.loads(raw[32 : 32 + hlen])
data = raw[-(-(32 + hlen) // 64) * 64 : -4]

def build(h):
    head = json.dumps(h).encode()
    buf = bytearray(raw[:8]) + struct.pack("<IIQQ", 1, 0, len(head), len(data)) + head
    buf += b"\0" * (-len(buf) % 64) + data
    return bytes(buf + struct.pack("<I", zlib.crc32(buf) & 0xFFFFFFFF))

x = np.zeros((1, 3, 32, 32), np.float32)
loaded = refused = ran = 0
values = [0, 1, 7, 1 << 30, -1, 2.5, "a", None, [1, 2], [0, 0], [1 << 40, 1], [1 << 24, 1 << 24]]
for i, op in enumerate(header["ops"]):
    for key in list(op):
        if key in ("name", "op"):
            continue
        for v in values:
            h = json.loads(json.dumps(header))
            h["ops"][i][key] = v
            try:
                engine = deploy.Engine(build(h), threads=1)
            except ValueError:
                refused += 1
                continue
            loaded += 1
            try:
                engine(x)
                ran += 1
            except ValueError:
                pass
print(loaded, refused, ran)
"""


@pytest.mark.slow
def test_mutated_headers_raise_value_errors_never_crash(tmp_path):
    # Every integer-ish field of every op set to odd values, checksum fixed: loading or
    # running must end in a result or a ValueError, in a process that survives.
    torch.manual_seed(0)
    path = deploy.export(models.create("cResNet20_1w1a").eval(), tmp_path / "c.ovsw")
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    proc = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, refused, ran = map(int, proc.stdout.split())
    assert refused > 1000 and loaded > 0


def python_runs_during(call, duration: float, points=(0.2, 0.4, 0.6)) -> list[float]:
    """Runs ``call()`` (which takes about ``duration`` seconds) while a second Python
    thread sleeps, the GIL released, until each fraction ``points`` of ``duration``
    after the call began, and then runs Python. Returns, per point, how long after the
    call returned (positive) or before (negative) that thread got to run.

    The interpreter's switch interval is set to 10 s meanwhile, so the calling thread
    hands the GIL over only when it releases it itself: a call that holds the GIL keeps
    the other thread out until it has returned and the caller blocks in ``join`` (every
    figure positive, whatever the timing); a call that releases it lets the other thread
    run on time (every figure negative). At the default 5 ms the interpreter would take
    the GIL from a Python-level caller, and the measurement would prove nothing."""
    import threading
    import time

    go = threading.Event()
    started = [0.0]
    ran: list[float] = []

    def other():
        go.wait()
        for p in points:
            time.sleep(max(0.0, started[0] + p * duration - time.perf_counter()))
            ran.append(time.perf_counter())

    thread = threading.Thread(target=other)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        thread.start()
        started[0] = time.perf_counter()
        go.set()
        call()
        ended = time.perf_counter()
    finally:
        sys.setswitchinterval(interval)
        thread.join()
    return [t - ended for t in ran]


def released_during(call, duration: float, tries: int = 3) -> bool:
    """Whether :func:`python_runs_during` sees the GIL free at every point of ``call``.
    A later try only helps a GIL-releasing call whose other thread the OS scheduled
    late; a GIL-holding call fails every try by construction."""
    return any(max(python_runs_during(call, duration)) < 0 for _ in range(tries))


def test_the_gil_measurement_refuses_a_call_that_holds_the_gil():
    # ctypes.PyDLL calls hold the GIL, ctypes.CDLL calls release it; a pure-Python
    # loop holds it too at the 10 s switch interval.
    import ctypes
    import time

    held, freed = ctypes.PyDLL(None).usleep, ctypes.CDLL(None).usleep
    for f in (held, freed):
        f.argtypes = [ctypes.c_uint]

    def busy():
        end = time.perf_counter() + 0.05
        while time.perf_counter() < end:
            pass

    assert min(python_runs_during(lambda: held(50_000), 0.05)) > 0
    assert min(python_runs_during(busy, 0.05)) > 0
    assert not released_during(lambda: held(50_000), 0.05, tries=1)
    assert released_during(lambda: freed(50_000), 0.05)


def test_calls_release_the_gil_and_run_concurrently(tmp_path):
    import threading
    import time

    model = calibrated("VGGSmall_1w1a", 32)
    engine = roundtrip(model, tmp_path, 32)
    engine.threads = 1
    x = np.random.default_rng(6).standard_normal((64, 3, 32, 32), dtype=np.float32)
    want = engine(x)
    took = []
    for _ in range(2):
        t0 = time.perf_counter()
        engine(x)
        took.append(time.perf_counter() - t0)
    # Another Python thread runs all through the engine's call.
    got = []
    assert released_during(lambda: got.append(engine(x)), min(took)), min(took)
    np.testing.assert_array_equal(got[-1], want)
    # Two threads sharing one engine get the sequential results.
    results = [None, None]

    def run(i):
        results[i] = engine(x[i * 32 : (i + 1) * 32])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(np.concatenate(results), want)
