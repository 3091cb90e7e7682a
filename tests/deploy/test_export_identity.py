"""Export writes the same bytes it always did (issue 10, "Must hold" 3).

For each of the five architectures a deterministic model is exported and the SHA-256
of the file is compared with a hash recorded from the exporter as it was before the
lowering (sign packing, scale/bias/BatchNorm folding) moved from numpy into Rust
(``crates/ovsw-engine/src/lower.rs``). A changed byte anywhere (a bit of the packed weights, the
last bit of a folded scale, the header) changes the hash.

The hashes must not depend on the machine, so nothing in the model or the file may:

- every parameter and BatchNorm statistic is drawn from a seeded numpy generator (no
  torch RNG, no forward pass);
- the header's time stamp and the ovsw and torch versions are pinned here;
- every float the exporter computes is exact in any reduction order. All binary convs
  own a learnable ``scaling_factor`` (a stored parameter), and the ``ste_v2`` models,
  whose scale is multiplied by ``mean_o|W|``, get weights whose ``|W|`` is one dyadic
  value per output channel: every partial sum is exact, so the mean is that value on
  any CPU, thread count or vector width. The folds themselves are elementwise float64
  (exact rounding, no reduction).

Not covered by a hash: the W-derived alpha of ``scaling_factor=False`` (SPEC 1.4),
``mean(|(W_o - mean W_o) / sqrt(Var W_o + eps)|)``. It is a float32 reduction inside
libtorch whose summation order follows the CPU's vector width (``ATEN_CPU_CAPABILITY``)
and the thread count, so its last bit, and with it the file's bytes, may differ between
machines for the same model. That path is covered end to end instead: the default
models of ``tests/deploy/test_deploy.py`` (``scaling_factor=False``) are exported and their
logits compared with ``model.eval()``'s, op by op where they differ.

Run as a script (``python tests/deploy/test_export_identity.py``) it prints the hashes as JSON;
the subprocess tests use that to check ``ATEN_CPU_CAPABILITY`` does not move them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import types
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

import ovsw
import ovsw.deploy as deploy
from ovsw import models
from ovsw.deploy import _export
from ovsw.testing import assert_close, elementwise_rel_err, max_abs_err, within

#: Per architecture: the binary-weight binarizer, whether some binary weights are
#: exactly zero (+0.0 and -0.0, so the file carries weight masks), and which binary and
#: float convs get a bias (every other one, so both kinds are in each file).
CONFIGS = {
    "cResNet20_1w1a": {"act_w": "ste_v2", "zeros": False, "fp_bias": True},
    "cResNet18_1w1a": {"act_w": "ste", "zeros": True, "fp_bias": False},
    "VGGSmall_1w1a": {"act_w": "ste_v2", "zeros": False, "fp_bias": True},
    "ResNet18_1w1a": {"act_w": "hardtanh", "zeros": True, "fp_bias": True},
    "ResNet34_1w1a": {"act_w": "hardtanhv2", "zeros": True, "fp_bias": False},
}

#: SHA-256 of each file, recorded from the numpy exporter before the lowering moved to
#: Rust. The two ste_v2 models were recorded again after one fix to that exporter: it
#: scaled a binary conv's bias by ``alpha * mean|W|`` instead of ``alpha`` (SPEC 1.5);
#: only their ``shift`` tensors changed (see test_folded_scale_and_shift_follow_spec).
EXPECTED = {
    "cResNet20_1w1a": "b77b51356f7e941b08cf6ff094f8a40b0c1552cf092e03431e4e63726ab617dc",
    "cResNet18_1w1a": "4d9c14d9dd3ed4fd449f5d85c03bd49e8c56a5147a8db02caffb45b0dc5984ef",
    "VGGSmall_1w1a": "8a6ab6e86202d9843e34a5233aceb1ed24e1e6fabb56afdb1f65956e812626ec",
    "ResNet18_1w1a": "cb963a18a44460d7c9a4643016cbfea27568f21da83ebcec4f67f5e0582cf1d3",
    "ResNet34_1w1a": "4a70d13efce4a8d921823c0335184b970c67a8cbd9ef465140c01d2e1cda3028",
}

PINNED_VERSION = "0.0.0+pinned"
PINNED_TIME = datetime.datetime(2024, 7, 8, 12, 0, 0, tzinfo=datetime.timezone.utc)


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _binary_weight(rng: np.random.Generator, shape, act_w: str, zeros: bool) -> np.ndarray:
    signs = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    if act_w == "ste_v2":
        # |W| = k / 64 per output channel, k in 1..63: dyadic, so mean_o|W| is exact.
        levels = rng.integers(1, 64, size=shape[0]) / 64.0
        w = signs * levels.reshape(-1, *([1] * (len(shape) - 1)))
    else:
        w = rng.standard_normal(shape) * 0.05
    if zeros:
        hit = rng.random(shape)
        w = np.where(hit < 0.02, 0.0, w)
        w = np.where(hit > 0.99, -0.0, w)
    return w


def build(arch: str) -> nn.Module:
    """The deterministic ``arch`` of :data:`CONFIGS`, in eval mode."""
    cfg = CONFIGS[arch]
    model = models.create(arch, num_classes=10, act_w=cfg["act_w"], scaling_factor=True)
    rng = np.random.default_rng(sum(arch.encode()))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    binary = [m for m in convs if isinstance(m, ovsw.OvSWConv2d)]
    floats = [m for m in convs if not isinstance(m, ovsw.OvSWConv2d)]
    for i, conv in enumerate(binary):
        if i % 2 == 1:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    if cfg["fp_bias"]:
        for conv in floats:
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ovsw.OvSWConv2d):
                shape = tuple(m.weight.shape)
                m.weight.copy_(_f32(_binary_weight(rng, shape, cfg["act_w"], cfg["zeros"])))
                m.scaling_factor.copy_(_f32(rng.uniform(0.05, 1.0, m.out_channels)))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(_f32(rng.standard_normal(tuple(m.weight.shape)) * 0.1))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(_f32(rng.normal(1.0, 0.5, c)))  # some negative
                m.bias.copy_(_f32(rng.normal(0.0, 0.3, c)))
                m.running_mean.copy_(_f32(rng.normal(0.0, 0.5, c)))
                m.running_var.copy_(_f32(rng.uniform(0.2, 2.0, c)))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(_f32(rng.uniform(0.0, 0.5, tuple(m.weight.shape))))
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(_f32(rng.normal(0.0, 0.2, tuple(m.bias.shape))))
    return model.eval()


@contextmanager
def pinned_header():
    """Pins what the header takes from the clock and the installed versions."""

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return PINNED_TIME.astimezone(tz)

    clock = types.SimpleNamespace(datetime=Clock, timezone=datetime.timezone)
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(_export, "datetime", clock))
        stack.enter_context(mock.patch.object(ovsw, "__version__", PINNED_VERSION))
        stack.enter_context(mock.patch.object(torch, "__version__", PINNED_VERSION))
        yield


def export_bytes(arch: str, folder: Path, model: nn.Module | None = None) -> bytes:
    """The pinned file of ``arch``, exported from ``model`` (``build(arch)`` if None)."""
    with pinned_header():
        path = deploy.export(build(arch) if model is None else model, folder / f"{arch}.ovsw")
    return path.read_bytes()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def header_of(raw: bytes) -> dict:
    return json.loads(raw[32 : 32 + struct.unpack("<Q", raw[16:24])[0]])


def all_hashes() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        return {arch: sha256(export_bytes(arch, Path(tmp))) for arch in models.names()}


# -- tests ------------------------------------------------------------------------------


def test_every_architecture_is_pinned():
    assert sorted(EXPECTED) == sorted(models.names()) == sorted(CONFIGS)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch", models.names())
def test_export_bytes_are_unchanged(arch, threads, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        raw = export_bytes(arch, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert sha256(raw) == EXPECTED[arch], f"{arch}: the exported file changed"


@pytest.mark.parametrize("arch", models.names())
def test_the_pinned_models_cover_every_fold(arch, tmp_path):
    """What the hashes pin: binary convs with and without bias, float convs with BN
    folded (and a bias where configured), weight masks exactly where weights are
    zero, and the header pinned."""
    cfg = CONFIGS[arch]
    raw = export_bytes(arch, tmp_path)
    header = header_of(raw)
    assert header["created"] == PINNED_TIME.isoformat(timespec="seconds")
    assert header["producer"] == f"ovsw {PINNED_VERSION}"
    assert header["torch"] == PINNED_VERSION
    model = build(arch)
    binary = dict(ovsw.binary_convs(model))
    assert all(c.scaling_factor is not None for c in binary.values())
    assert {c.bias is None for c in binary.values()} == {True, False}
    bconvs = [op for op in header["ops"] if op["op"] == "bconv2d"]
    assert len(bconvs) == len(binary)
    masks = [op["weight_mask"] is not None for op in bconvs]
    assert all(masks) if cfg["zeros"] else not any(masks)
    assert any(op["op"] == "affine" for op in header["ops"])
    if cfg["act_w"] == "ste_v2":  # |W| constant per output channel (exact mean)
        for conv in binary.values():
            a = conv.weight.detach().abs().flatten(1)
            assert torch.equal(a, a[:, :1].expand_as(a))


# -- the pinned bytes are right, not only unchanged ------------------------------------


def _file_tensor(raw: bytes, header: dict, name: str) -> np.ndarray:
    entry = header["tensors"][name]
    data = 32 + struct.unpack("<Q", raw[16:24])[0]
    data += -data % 64
    start = data + entry["offset"]
    dtype = {"f32": "<f4", "u64": "<u8"}[entry["dtype"]]
    flat = np.frombuffer(raw[start : start + entry["nbytes"]], dtype=dtype)
    return flat.reshape(entry["shape"])


def _following_bn(arch: str, conv: str) -> str | None:
    """The BatchNorm that directly follows conv ``conv`` in ``arch`` (SPEC 4), or None
    where a max-pool stands between them (VGG-Small's conv1, conv3 and conv5)."""
    parent, _, leaf = conv.rpartition(".")
    if arch.startswith("VGGSmall"):
        return None if leaf in ("conv1", "conv3", "conv5") else f"bn{leaf[4:]}"
    if leaf == "0":  # cResNet18's shortcut, ResNet's downsample: Sequential(conv, bn)
        return f"{parent}.1"
    return f"{parent}.bn{leaf[4:]}" if parent else f"bn{leaf[4:]}"


def _f64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


def spec_folds(arch: str, model: nn.Module, plant: str | None = None) -> dict[str, np.ndarray]:
    """Every float tensor the file of ``model`` must hold, by its name in the header,
    computed here in float64 from the layers' own tensors (SPEC 1.3-1.5 and 4, eval
    mode), never through ovsw's lowering:

    - a BatchNorm in eval mode is ``k * x + c`` with ``k = gamma / sqrt(var + eps)``,
      ``c = beta - mean * k``; an ``affine`` op stores ``(k, c)``;
    - a binary conv computes ``alpha * (m * dot + bias)`` with ``m = mean_o|W|`` for
      ste_v2 (else 1): its ``bconv2d`` op stores ``scale = alpha * m * k`` and
      ``shift = (alpha * bias - mean) * k + beta`` of the BatchNorm after it (none
      after VGG-Small's conv1/3/5: ``alpha * m`` and ``alpha * bias``);
    - a float conv stores ``W * k`` as ``[O, kh, kw, C/groups]`` and
      ``(bias - mean) * k + beta``; ``linear`` and PReLU slopes are stored as they are.

    ``plant`` computes one of them wrongly on purpose (the tests show each falls
    outside the tolerance): ``"bias_times_m"`` scales a binary conv's bias by
    ``alpha * m`` (the exporter's old ste_v2 bug), ``"mean_sign"`` adds the running
    mean instead of subtracting it, ``"no_eps"`` drops BatchNorm's eps, and
    ``"fold_through_pool"`` folds VGG-Small's BatchNorms through the max-pool."""
    modules = dict(model.named_modules())

    def bn_fold(name: str | None, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if name is None:
            return np.ones(channels), np.zeros(channels), np.zeros(channels)
        bn = modules[name]
        eps = 0.0 if plant == "no_eps" else bn.eps
        k = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + eps)
        mean = _f64(bn.running_mean) * (-1.0 if plant == "mean_sign" else 1.0)
        return k, mean, _f64(bn.bias)

    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and n != "fc"]
    folded = {_following_bn(arch, n) for n in convs}
    out: dict[str, np.ndarray] = {}
    for name, m in modules.items():
        if isinstance(m, ovsw.OvSWConv2d):
            bn_name = _following_bn(arch, name)
            if plant == "fold_through_pool" and bn_name is None:
                bn_name = f"bn{name[4:]}"
            k, mean, beta = bn_fold(bn_name, m.out_channels)
            alpha = _f64(m.scaling_factor)
            w_mean = np.abs(_f64(m.weight)).reshape(m.out_channels, -1).mean(1)
            mw = w_mean if m.act_w == "ste_v2" else np.ones(m.out_channels)
            bias = _f64(m.bias) if m.bias is not None else np.zeros(m.out_channels)
            bias_scale = alpha * w_mean if plant == "bias_times_m" else alpha
            out[f"{name}.scale"] = alpha * mw * k
            out[f"{name}.shift"] = (bias_scale * bias - mean) * k + beta
        elif isinstance(m, nn.Conv2d) and name != "fc":
            k, mean, beta = bn_fold(_following_bn(arch, name), m.out_channels)
            w = _f64(m.weight) * k[:, None, None, None]
            out[f"{name}.weight"] = w.transpose(0, 2, 3, 1)
            bias = _f64(m.bias) if m.bias is not None else np.zeros(m.out_channels)
            out[f"{name}.bias"] = (bias - mean) * k + beta
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and name not in folded:
            k, mean, beta = bn_fold(name, m.num_features)
            out[f"{name}.scale"] = k
            out[f"{name}.shift"] = beta - mean * k
        elif isinstance(m, (nn.Linear, nn.Conv2d)):  # the head (cResNet18's is a 1x1 conv)
            out[f"{name}.weight"] = _f64(m.weight).reshape(m.weight.shape[0], -1)
            out[f"{name}.bias"] = _f64(m.bias)
        elif isinstance(m, nn.PReLU):  # VGG-Small's nonlinear5, the activation of bn5
            out[f"bn{name[len('nonlinear') :]}.prelu"] = _f64(m.weight)
    return out


#: Each stored float is the float64 value above rounded once to float32: within half
#: an ulp, 2**-24 relative; twice that leaves room for float64 summation order.
FOLD_RTOL = 2.0**-23


def compare_folds(raw: bytes, header: dict, expected: dict[str, np.ndarray]) -> float:
    """Asserts that every float32 tensor of the file equals ``expected`` (same names)
    within :data:`FOLD_RTOL` of each element; returns the worst error of an element
    relative to its own magnitude."""
    stored = {n for n, e in header["tensors"].items() if e["dtype"] == "f32"}
    by_op = {}
    for op in header["ops"]:
        for key in ("weight", "bias", "scale", "shift", "prelu"):
            if op.get(key) in stored:
                by_op[op[key]] = f"{op['name']}.{key}"
    assert set(by_op) == stored, f"tensors no op names: {sorted(stored - set(by_op))}"
    missing = set(expected) - set(by_op.values())
    assert not missing and len(by_op) == len(expected), sorted(missing)
    worst = 0.0
    for tensor, key in by_op.items():
        got, want = _file_tensor(raw, header, tensor), expected[key]
        assert_close(got, want, rtol=FOLD_RTOL, what=key)
        worst = max(worst, elementwise_rel_err(got, want, floor=1e-30))
    return worst


@pytest.mark.parametrize("arch", models.names())
def test_folded_scale_and_shift_follow_spec(arch, tmp_path):
    """Every float tensor of each pinned file (every binary layer's scale and shift,
    every BatchNorm left as an affine op, the float convs with their BatchNorm folded,
    the head and PReLU slopes) equals :func:`spec_folds`, computed independently in
    float64 from the model's parameters."""
    model = build(arch)
    raw = export_bytes(arch, tmp_path, model)
    header = header_of(raw)
    assert compare_folds(raw, header, spec_folds(arch, model)) <= FOLD_RTOL
    bconvs = {op["name"] for op in header["ops"] if op["op"] == "bconv2d"}
    assert bconvs == set(dict(ovsw.binary_convs(model))) != set()


@pytest.mark.parametrize(
    "arch,plants",
    [
        ("cResNet20_1w1a", ["bias_times_m", "no_eps"]),  # ste_v2; eps: 4e-4 relative
        ("VGGSmall_1w1a", ["mean_sign", "fold_through_pool"]),
    ],
)
def test_a_wrong_fold_falls_outside_the_tolerance(arch, plants, tmp_path):
    model = build(arch)
    raw = export_bytes(arch, tmp_path, model)
    header = header_of(raw)
    for plant in plants:
        with pytest.raises(AssertionError, match="out of atol"):
            compare_folds(raw, header, spec_folds(arch, model, plant))


def test_binary_convs_with_bias_match_their_layers(tmp_path):
    """End to end through the engine, on the pinned cResNet20 (ste_v2, every other
    binary conv with a bias): each ``bconv2d`` op equals its layer, BatchNorm, residual
    and Hardtanh in PyTorch's eval mode."""
    arch = "cResNet20_1w1a"
    from conftest import engine_threads  # here: this file also runs as a script

    raw = export_bytes(arch, tmp_path)
    engine = deploy.load(tmp_path / f"{arch}.ovsw", threads=engine_threads())
    model = build(arch)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(3)
    checked = 0
    for op in header_of(raw)["ops"]:
        if op["op"] != "bconv2d" or modules[op["name"]].bias is None:
            continue
        conv = modules[op["name"]]
        block, _, leaf = op["name"].rpartition(".")
        bn = modules[f"{block}.{ {'conv1': 'bn1', 'conv2': 'bn2'}[leaf] }"]
        x = torch.randn(2, conv.in_channels, 8, 8, generator=gen)
        with torch.no_grad():
            out = bn(conv(x))
            residual = torch.randn(out.shape, generator=gen)
            want = nn.functional.hardtanh(out + residual).numpy()
        got = engine.run_op(op["name"], x.numpy(), residual.numpy())
        assert within(max_abs_err(got, want), 1e-5), op["name"]
        checked += 1
    assert checked == 9


#: ATen's CPU capabilities, narrowest first.
CAPABILITIES = ("default", "avx2", "avx512")


def capped_capability(requested: str | None, outer: str | None) -> str | None:
    """The ``ATEN_CPU_CAPABILITY`` for a child that asks for ``requested`` (None: this
    CPU's best) under an environment that already sets ``outer``: never wider than the
    outer one, so a run that simulates a smaller CPU (CI's AVX2 run) stays simulated."""
    if outer is None or outer.lower() not in CAPABILITIES:
        return requested
    if requested is None:
        return outer
    return min(requested, outer.lower(), key=CAPABILITIES.index)


def test_capped_capability():
    assert capped_capability(None, None) is None
    assert capped_capability("avx2", None) == "avx2"
    assert capped_capability(None, "avx2") == "avx2"
    assert capped_capability("avx512", "avx2") == "avx2"
    assert capped_capability("default", "avx2") == "default"
    assert capped_capability("avx2", "AVX512") == "avx2"


@pytest.mark.parametrize("requested", [None, "avx2", "default"])
def test_hashes_do_not_depend_on_the_cpu_capability(requested):
    """libtorch's kernels for this CPU's best vector width (unset), AVX2, or none
    (``default``, scalar) must not move a byte."""
    env = dict(os.environ)
    capability = capped_capability(requested, env.pop("ATEN_CPU_CAPABILITY", None))
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    script = Path(__file__).resolve()
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    if capability is not None:
        assert report["capability"] == capability.upper()
    assert report["hashes"] == EXPECTED


if __name__ == "__main__":
    capability = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"capability": capability, "hashes": all_hashes()}))
