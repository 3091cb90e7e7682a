"""Export writes the same bytes it always did (issue 10, "Must hold" 3).

For each of the five architectures a deterministic model is exported and the SHA-256
of the file is compared with a hash recorded from the exporter as it was before the
lowering (sign packing, scale/bias/BatchNorm folding) moved from numpy into Rust
(``src/deploy/lower.rs``). A changed byte anywhere (a bit of the packed weights, the
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
models of ``tests/test_deploy.py`` (``scaling_factor=False``) are exported and their
logits compared with ``model.eval()``'s, op by op where they differ.

Run as a script (``python tests/test_export_identity.py``) it prints the hashes as JSON;
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


def export_bytes(arch: str, folder: Path) -> bytes:
    with pinned_header():
        path = deploy.export(build(arch), folder / f"{arch}.ovsw")
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


@pytest.mark.parametrize("arch", ["cResNet20_1w1a", "ResNet18_1w1a"])
def test_folded_scale_and_shift_follow_spec(arch, tmp_path):
    """Each binary conv's stored scale/shift equal SPEC 1.3-1.5 in eval mode followed
    by its BatchNorm, written out here in float64 from the layer's tensors:
    ``bn(alpha * (m * dot + bias))`` with ``m = mean_o|W|`` for ste_v2 (else 1), that
    is scale ``alpha * m * k`` and shift ``(alpha * bias - mean) * k + beta``."""
    raw = export_bytes(arch, tmp_path)
    header = header_of(raw)
    model = build(arch)
    modules = dict(model.named_modules())
    checked = 0
    for op in header["ops"]:
        if op["op"] != "bconv2d":
            continue
        conv = modules[op["name"]]
        parent, _, leaf = op["name"].rpartition(".")
        bn = modules[f"{parent}.{ {'conv1': 'bn1', 'conv2': 'bn2'}[leaf] }"]
        alpha = conv.scaling_factor.detach().double()
        m = conv.weight.detach().double().abs().flatten(1).mean(1)
        if conv.act_w != "ste_v2":
            m = torch.ones_like(m)
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(m)
        k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        scale = alpha * m * k
        shift = (alpha * bias - bn.running_mean.double()) * k + bn.bias.detach().double()
        got_scale = _file_tensor(raw, header, op["scale"])
        got_shift = _file_tensor(raw, header, op["shift"])
        np.testing.assert_allclose(got_scale, scale.numpy(), rtol=1e-6, err_msg=op["name"])
        np.testing.assert_allclose(got_shift, shift.numpy(), rtol=1e-6, atol=1e-6)
        checked += 1
    assert checked == len(dict(ovsw.binary_convs(model))) > 0


def test_binary_convs_with_bias_match_their_layers(tmp_path):
    """End to end through the engine, on the pinned cResNet20 (ste_v2, every other
    binary conv with a bias): each ``bconv2d`` op equals its layer, BatchNorm, residual
    and Hardtanh in PyTorch's eval mode."""
    arch = "cResNet20_1w1a"
    raw = export_bytes(arch, tmp_path)
    engine = deploy.load(tmp_path / f"{arch}.ovsw", threads=2)
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
        assert np.abs(got - want).max() <= 1e-5, op["name"]
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
