"""Export a trained model to the deploy file format read by the Rust engine.

File layout (version 1; all integers little-endian)::

    0       8   magic b"OVSWNET\\0"
    8       4   format version (u32, 1)
    12      4   flags (u32, 0)
    16      8   header length H (u64)
    24      8   data length D (u64)
    32      H   header: UTF-8 JSON
    ..          zero bytes up to a multiple of 64
    ..      D   data: raw tensors, each at a 64-byte-aligned offset
    end-4   4   CRC-32 (zlib) of every byte before it (u32)

The header holds metadata (``format``, ``version``, ``producer``, ``arch``, ``input``,
``num_classes``, ``created`` and whatever the caller adds), ``tensors`` (name ->
``{"dtype": "f32" | "u64", "shape", "offset", "nbytes"}``, offsets into the data
section), ``ops`` and ``output``. Ops run in order; each reads value ``x`` (value 0 is
the input, NCHW at the API and NHWC inside the engine) and writes the next value ``y``:

- ``conv2d``: full-precision convolution, weight ``[O, kh, kw, C/groups]`` f32 with
  BatchNorm folded in, optional ``bias`` [O], geometry (``in_channels``,
  ``out_channels``, ``kernel``, ``stride``, ``padding``, ``dilation``, ``groups``),
  optional ``act``.
- ``bconv2d``: binary convolution, same geometry (an ``OvSWLinear`` is one with a 1x1
  kernel on the ``[N, 1, 1, in]`` features: XNOR-popcount rows of a GEMM); ``weight`` ``[O, kh, kw,
  ceil(C/groups / 64)]`` u64, bit ``c % 64`` of word ``c // 64`` set where
  ``W[o, c, ky, kx] < 0``; ``weight_mask`` (same shape, set where the weight is non-zero)
  only when some weight is exactly 0. Output ``scale[o] * dot + shift[o]``, where dot is
  the +-1 dot product over taps inside the image (zero padding contributes 0), plus value
  ``residual`` if given, then ``act``. ``scale``/``shift`` fold the layer's scale
  (``scaling_factor`` or the W-derived alpha, times ``mean|W|`` for ``ste_v2``), its bias
  and the BatchNorm that follows it.
- ``affine``: per-channel ``scale * x + shift`` (a BatchNorm that cannot be folded),
  then ``act``.
- ``maxpool`` / ``avgpool``: PyTorch's pooling (``kernel``, ``stride``, ``padding``,
  ``dilation`` for max, ``ceil_mode``, ``count_include_pad`` for avg).
- ``global_avgpool``, ``pad_channels`` (``before``, ``after`` zero channels),
  ``flatten`` (``torch.flatten(x, 1)`` order), ``linear`` (``weight`` [out, in], ``bias``).

``act`` is ``"none"``, ``"hardtanh"`` (with ``act_range`` [min, max]) or ``"prelu"``
(with tensor ``prelu``, 1 or C slopes); ReLU is stored as a PReLU of slope 0, ReLU6 as
hardtanh [0, 6].

ovsw's own architectures are lowered by hand (below); any other model, for instance
one :func:`ovsw.binarize` converted, through its ``torch.fx`` graph
(:mod:`ovsw.deploy._fx`).
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _core
from ..models.cifar_resnet import CifarResNetA, CifarResNetB, PadShortcut
from ..models.resnet import ResNet
from ..models.vgg import VGGSmall
from ..nn import BinaryLayer, OvSWConv2d, OvSWLinear, _explicit_padding

__all__ = ["export", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"OVSWNET\0"
FORMAT_VERSION = 1
_ALIGN = 64


class _Graph:
    """Collects tensors and ops while a model is lowered."""

    def __init__(self) -> None:
        self.tensors: dict[str, dict] = {}
        self.blobs: list[bytes] = []
        self.size = 0
        self.ops: list[dict] = []
        self.values = 1  # value 0 is the input

    def tensor(self, name: str, array: np.ndarray) -> str:
        if array.dtype == np.float32 or array.dtype == np.float64:
            array, dtype = np.ascontiguousarray(array, dtype="<f4"), "f32"
        elif array.dtype == np.uint64:
            array, dtype = np.ascontiguousarray(array, dtype="<u8"), "u64"
        else:  # pragma: no cover - internal misuse
            raise TypeError(f"cannot store {array.dtype}")
        if name in self.tensors:  # pragma: no cover - internal misuse
            raise ValueError(f"tensor {name!r} stored twice")
        pad = -self.size % _ALIGN
        if pad:
            self.blobs.append(b"\0" * pad)
            self.size += pad
        raw = array.tobytes()
        self.tensors[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "offset": self.size,
            "nbytes": len(raw),
        }
        self.blobs.append(raw)
        self.size += len(raw)
        return name

    def op(self, op: str, name: str, x: int, **fields) -> int:
        y = self.values
        self.values += 1
        self.ops.append({"op": op, "name": name, "x": x, "y": y, **fields})
        return y

    def to_bytes(self, metadata: dict) -> bytes:
        header = dict(metadata)
        header.update(tensors=self.tensors, ops=self.ops, output=self.values - 1)
        head = json.dumps(header, separators=(",", ":")).encode()
        data = b"".join(self.blobs)
        out = bytearray(MAGIC)
        out += struct.pack("<IIQQ", FORMAT_VERSION, 0, len(head), len(data))
        out += head
        out += b"\0" * (-len(out) % _ALIGN)
        out += data
        out += struct.pack("<I", zlib.crc32(out) & 0xFFFFFFFF)
        return bytes(out)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _bn_fold(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(k, c) with ``bn(x) == k * x + c`` per channel in eval mode (float64)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm layer, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "BatchNorm without running statistics (track_running_stats=False) normalises "
            "with batch statistics even in eval mode and cannot be deployed"
        )
    return _core.deploy_fold_batchnorm(
        bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps)
    )


def _act_fields(g: _Graph, name: str, act: nn.Module | None) -> dict:
    if act is None or isinstance(act, nn.Identity):
        return {"act": "none"}
    if isinstance(act, nn.Hardtanh):
        return {"act": "hardtanh", "act_range": [float(act.min_val), float(act.max_val)]}
    if isinstance(act, nn.PReLU):
        return {"act": "prelu", "prelu": g.tensor(name + ".prelu", _f64(act.weight))}
    if isinstance(act, nn.ReLU):
        return {"act": "prelu", "prelu": g.tensor(name + ".prelu", np.zeros(1))}
    if isinstance(act, nn.ReLU6):
        return {"act": "hardtanh", "act_range": [0.0, 6.0]}
    raise TypeError(f"no deploy lowering for activation {type(act).__name__}")


def _geometry(conv: nn.Conv2d) -> dict:
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode={conv.padding_mode!r} cannot be deployed")
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": list(_explicit_padding(conv)),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
    }


def _fp_conv(g, x, name, conv, bn=None, act=None) -> int:
    """A float ``conv2d`` op with the following BatchNorm folded into it."""
    if isinstance(conv, OvSWConv2d) or not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name}: expected a full-precision nn.Conv2d")
    fold = _bn_fold(bn) if bn is not None else None
    w, b = _core.deploy_fold_conv2d(conv.weight, conv.bias, fold)  # w: [O, kh, kw, C/g]
    return g.op(
        "conv2d",
        name,
        x,
        weight=g.tensor(name + ".weight", w),
        bias=g.tensor(name + ".bias", b) if b is not None else None,
        **_geometry(conv),
        **_act_fields(g, name, act),
    )


def pack_signs(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Sign bits of a conv weight ``[O, C, kh, kw]`` as ``[O, kh, kw, ceil(C/64)]``
    uint64 words (bit ``c % 64`` of word ``c // 64`` set where the weight is negative),
    and the non-zero mask in the same layout, or ``None`` when no weight is zero.
    The weight is read as float32 first."""
    return _core.deploy_pack_signs(weight.detach())


def _binary_affine(layer: BinaryLayer, bn) -> tuple[np.ndarray, np.ndarray]:
    """A binary layer's scale, bias and following BatchNorm as one per-channel
    ``(scale, shift)`` of its +-1 dot products (SPEC 1.3-1.5 in eval mode, folded by the
    Rust core). A linear layer's weight is read as a 1x1 conv's."""
    weight = layer.weight.detach()
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    fold = _bn_fold(bn) if bn is not None else None
    return _core.deploy_fold_bconv2d(weight, layer.scaling_factor, layer.bias, layer.act_w, fold)


def _bconv(g, x, name, conv, bn=None, act=None, residual=None) -> int:
    """A ``bconv2d`` op: sign bits, and the layer's scale, bias and BatchNorm folded
    into one per-channel ``scale``/``shift`` (SPEC 1.3-1.5 in eval mode)."""
    if not isinstance(conv, OvSWConv2d):
        raise TypeError(f"{name}: expected an OvSWConv2d")
    scale, shift = _binary_affine(conv, bn)
    bits, mask = pack_signs(conv.weight.detach())
    return g.op(
        "bconv2d",
        name,
        x,
        weight=g.tensor(name + ".weight", bits),
        weight_mask=g.tensor(name + ".weight_mask", mask) if mask is not None else None,
        scale=g.tensor(name + ".scale", scale),
        shift=g.tensor(name + ".shift", shift),
        residual=residual,
        **_geometry(conv),
        **_act_fields(g, name, act),
    )


def _blinear(g, x, name, layer, bn=None, act=None, residual=None) -> int:
    """An :class:`~ovsw.OvSWLinear` as a ``bconv2d`` op with a 1x1 kernel over the
    ``[N, 1, 1, in]`` features: the engine's XNOR-popcount rows, exact like the convs."""
    if not isinstance(layer, OvSWLinear):
        raise TypeError(f"{name}: expected an OvSWLinear")
    scale, shift = _binary_affine(layer, bn)
    weight = layer.weight.detach().float().cpu()
    bits, mask = pack_signs(weight[:, :, None, None])
    geometry = {
        "in_channels": layer.in_features,
        "out_channels": layer.out_features,
        "kernel": [1, 1],
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
        "groups": 1,
    }
    return g.op(
        "bconv2d",
        name,
        x,
        weight=g.tensor(name + ".weight", bits),
        weight_mask=g.tensor(name + ".weight_mask", mask) if mask is not None else None,
        scale=g.tensor(name + ".scale", scale),
        shift=g.tensor(name + ".shift", shift),
        residual=residual,
        **geometry,
        **_act_fields(g, name, act),
    )


def _affine(g, x, name, bn, act=None) -> int:
    k, c = _bn_fold(bn)
    return g.op(
        "affine",
        name,
        x,
        channels=len(k),
        scale=g.tensor(name + ".scale", k),
        shift=g.tensor(name + ".shift", c),
        **_act_fields(g, name, act),
    )


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def _pool(g, x, name, pool: nn.Module) -> int:
    if isinstance(pool, nn.Identity):
        return x
    if not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        raise TypeError(f"{name}: no deploy lowering for {type(pool).__name__}")
    window = {
        "kernel": _pair(pool.kernel_size),
        "stride": _pair(pool.stride if pool.stride is not None else pool.kernel_size),
        "padding": _pair(pool.padding),
        "ceil_mode": bool(pool.ceil_mode),
    }
    if isinstance(pool, nn.MaxPool2d):
        if pool.return_indices:
            raise ValueError(f"{name}: MaxPool2d(return_indices=True) cannot be deployed")
        return g.op("maxpool", name, x, dilation=_pair(pool.dilation), **window)
    if pool.divisor_override is not None:
        raise ValueError(f"{name}: AvgPool2d(divisor_override=...) cannot be deployed")
    return g.op("avgpool", name, x, count_include_pad=bool(pool.count_include_pad), **window)


def _global_pool(g, x, name, pool: nn.Module | None = None) -> int:
    if pool is not None and not (
        isinstance(pool, nn.AdaptiveAvgPool2d) and _pair(pool.output_size) == [1, 1]
    ):
        raise TypeError(f"{name}: expected AdaptiveAvgPool2d(1)")
    return g.op("global_avgpool", name, x)


def _linear(g, x, name, fc: nn.Module) -> int:
    if isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1) and fc.groups == 1:
        w = _f64(fc.weight)[:, :, 0, 0]  # a 1x1 conv on a 1x1 map is a linear layer
    elif isinstance(fc, nn.Linear):
        w = _f64(fc.weight)
    else:
        raise TypeError(f"{name}: expected nn.Linear or a 1x1 nn.Conv2d head")
    return g.op(
        "linear",
        name,
        x,
        in_features=w.shape[1],
        out_features=w.shape[0],
        weight=g.tensor(name + ".weight", w),
        bias=g.tensor(name + ".bias", _f64(fc.bias)) if fc.bias is not None else None,
    )


# -- architectures ------------------------------------------------------------------------


def _cifar_resnet_a(g: _Graph, m: CifarResNetA) -> int:
    x = _fp_conv(g, 0, "conv1", m.conv1, m.bn1, m.act)
    for stage in ("layer1", "layer2", "layer3"):
        for i, blk in enumerate(getattr(m, stage)):
            p = f"{stage}.{i}"
            if isinstance(blk.shortcut, PadShortcut):
                sc = _pool(g, x, p + ".shortcut.pool", blk.shortcut.pool)
                pad = blk.shortcut.pad
                sc = g.op("pad_channels", p + ".shortcut", sc, before=pad, after=pad)
            elif isinstance(blk.shortcut, nn.Identity):
                sc = x
            else:
                raise TypeError(f"{p}.shortcut: unexpected {type(blk.shortcut).__name__}")
            out = _bconv(g, x, p + ".conv1", blk.conv1, blk.bn1, blk.act1, residual=sc)
            x = _bconv(g, out, p + ".conv2", blk.conv2, blk.bn2, blk.act2, residual=out)
    x = _global_pool(g, x, "avg_pool2d")
    x = _affine(g, x, "bn2", m.bn2)
    return _linear(g, x, "linear", m.linear)


def _cifar_resnet_b(g: _Graph, m: CifarResNetB) -> int:
    x = _fp_conv(g, 0, "conv1", m.conv1, m.bn1)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(m, stage)):
            p = f"{stage}.{i}"
            out = _bconv(g, x, p + ".conv1", blk.conv1, blk.bn1, blk.act1)
            if isinstance(blk.shortcut, nn.Identity):
                sc = x
            else:
                conv, bn = blk.shortcut[0], blk.shortcut[1]
                sc = _bconv(g, x, p + ".shortcut.0", conv, bn)
            x = _bconv(g, out, p + ".conv2", blk.conv2, blk.bn2, blk.act2, residual=sc)
    x = _global_pool(g, x, "avgpool", m.avgpool)
    x = _affine(g, x, "bn2", m.bn2)
    return _linear(g, x, "fc", m.fc)


def _vgg_small(g: _Graph, m: VGGSmall) -> int:
    x = _fp_conv(g, 0, "conv0", m.conv0, m.bn0, m.nonlinear0)
    for i in range(1, 6):
        conv = getattr(m, f"conv{i}")
        bn = getattr(m, f"bn{i}")
        act = getattr(m, f"nonlinear{i}")
        if i in (1, 3, 5):  # conv -> max-pool -> bn -> act: the pool blocks the fold
            x = _bconv(g, x, f"conv{i}", conv)
            x = _pool(g, x, f"pooling{i}", m.pooling)
            x = _affine(g, x, f"bn{i}", bn, act)
        else:
            x = _bconv(g, x, f"conv{i}", conv, bn, act)
    x = g.op("flatten", "flatten", x)
    return _linear(g, x, "fc", m.fc)


def _resnet(g: _Graph, m: ResNet) -> int:
    x = _fp_conv(g, 0, "conv1", m.conv1, m.bn1, m.act)
    x = _pool(g, x, "maxpool", m.maxpool)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(m, stage)):
            p = f"{stage}.{i}"
            if blk.downsample is not None:
                conv, bn = blk.downsample[0], blk.downsample[1]
                res = _fp_conv(g, x, p + ".downsample.0", conv, bn)
            else:
                res = x
            out = _bconv(g, x, p + ".conv1", blk.conv1, blk.bn1, blk.act1, residual=res)
            x = _bconv(g, out, p + ".conv2", blk.conv2, blk.bn2, blk.act2, residual=out)
    x = _global_pool(g, x, "avgpool", m.avgpool)
    x = _affine(g, x, "bn2", m.bn2)
    return _linear(g, x, "fc", m.fc)


# (lowering, default input height/width)
_LOWERINGS = {
    CifarResNetA: (_cifar_resnet_a, 32),
    CifarResNetB: (_cifar_resnet_b, 32),
    VGGSmall: (_vgg_small, 32),
    ResNet: (_resnet, 224),
}


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | tuple[int, int] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write ``model`` (in eval mode) to ``path`` as a self-contained deploy file.

    Binary convs are stored as sign bits, 1 bit per weight, with their per-channel scale,
    bias and the BatchNorm after them folded into one per-channel scale and shift; the
    full-precision layers (stem, downsample convs, heads, PReLU) stay float32, with
    BatchNorm folded into a preceding float conv. The file is written atomically (a
    temporary file renamed into place). Read it back with :func:`ovsw.deploy.load`.

    Args:
        model: one of ovsw's architectures (``ovsw.models``), or any network whose
            ``torch.fx`` graph the engine's ops cover (:mod:`ovsw.deploy._fx`; for
            instance a torchvision ResNet, VGG or MobileNetV2 that :func:`ovsw.binarize`
            converted), possibly wrapped in DistributedDataParallel; it must be in eval
            mode (``model.eval()``).
        path: the file to write (conventionally ``*.ovsw``).
        input_size: the input height and width the model is meant for, recorded in the
            header (default 224 for the ImageNet ResNets and other models, 32 for the
            CIFAR models); a model lowered through torch.fx is traced at this size.
        metadata: extra JSON-serialisable entries for the header (under ``"user"``).

    Returns:
        The path written.

    Raises:
        TypeError: the model (or the first op of its graph that has none) has no deploy
            lowering, naming it.
        ValueError: the model is in training mode, or a layer cannot be deployed.
    """
    model = getattr(model, "module", model)  # DDP / DataParallel
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "export needs the model in eval mode (BatchNorm running statistics): "
            "call model.eval() first"
        )
    lowering = next((v for k, v in _LOWERINGS.items() if type(model) is k), None)
    default_size = lowering[1] if lowering is not None else 224
    size = input_size if input_size is not None else default_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    g = _Graph()
    with torch.no_grad():
        if lowering is not None:
            lowering[0](g, model)
            channels = g.ops[0]["in_channels"]
        else:
            from . import _fx

            channels = _fx.lower(g, model, int(h), int(w))
    last = g.ops[-1]
    num_classes = last.get("out_features", last.get("out_channels"))
    from .. import __version__

    header = {
        "format": "ovsw-deploy",
        "version": FORMAT_VERSION,
        "producer": f"ovsw {__version__}",
        "torch": torch.__version__,
        "arch": type(model).__name__,
        "input": {"channels": channels, "height": int(h), "width": int(w)},
        "num_classes": num_classes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if metadata is not None:
        header["user"] = metadata
    blob = g.to_bytes(header)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
