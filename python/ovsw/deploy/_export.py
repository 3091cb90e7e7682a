"""Export a trained model to the deploy file format read by the Rust engine.

The Rust engine writes and reads the file (``crates/ovsw-engine/src/format.rs`` defines
the layout, ``writer.rs`` writes it); this module and :mod:`ovsw.deploy._fx` only lower
the model to ops and tensors. File layout (version 1; all integers little-endian)::

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
(:mod:`ovsw.deploy._fx`); both build their ops with :mod:`ovsw.deploy._ops`.
"""

from __future__ import annotations

import datetime
import numbers
import os
from pathlib import Path

import torch
from torch import nn

from .. import _core
from ..models.cifar_resnet import CifarResNetA, CifarResNetB, PadShortcut
from ..models.resnet import ResNet
from ..models.vgg import VGGSmall
from . import _fx
from ._ops import _affine, _bconv, _fp_conv, _global_pool, _Graph, _linear, _pool

__all__ = ["export", "FORMAT_VERSION"]

#: The deploy file format version this ovsw writes and reads (the Rust engine's).
FORMAT_VERSION: int = _core.DEPLOY_FORMAT_VERSION


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


def _input_size(size) -> tuple[int, int]:
    """``(height, width)`` from ``export``'s ``input_size``: a positive int (square) or a
    pair of them; ``ValueError`` naming that form for anything else (a ``(C, H, W)``
    triple, a string, 0, a negative number, a bool, a float)."""

    def positive(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0

    if positive(size):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(map(positive, size)):
        return int(size[0]), int(size[1])
    raise ValueError(
        f"input_size must be a positive int or a (height, width) pair of positive ints, "
        f"got {size!r}"
    )


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
        input_size: the input height and width the model is meant for, an int (square)
            or a ``(height, width)`` pair, recorded in the header (default 224 for the
            ImageNet ResNets and other models, 32 for the CIFAR models); a model lowered
            through torch.fx is traced at this size. A network with a global average
            pool before its head runs on other sizes too
            (:attr:`ovsw.deploy.Engine.accepts_any_size`).
        metadata: extra JSON-serialisable entries for the header (under ``"user"``).

    Returns:
        The path written.

    Raises:
        TypeError: the model (or the first op of its graph that has none) has no deploy
            lowering, naming it.
        ValueError: the model is in training mode, ``input_size`` is not a positive
            int or a pair of them, or a layer cannot be deployed.
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
    h, w = _input_size(input_size if input_size is not None else default_size)
    g = _Graph()
    with torch.no_grad():
        if lowering is not None:
            lowering[0](g, model)
            channels = g.ops[0]["in_channels"]
        else:
            channels = _fx.lower(g, model, h, w)
    last = g.ops[-1]
    num_classes = last.get("out_features", last.get("out_channels"))
    from .. import __version__

    header = {
        "producer": f"ovsw {__version__}",
        "torch": torch.__version__,
        "arch": type(model).__name__,
        "input": {"channels": channels, "height": h, "width": w},
        "num_classes": num_classes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if metadata is not None:
        header["user"] = metadata
    path = Path(path)
    g.write(path, header)
    return path
