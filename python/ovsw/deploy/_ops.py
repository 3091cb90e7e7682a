"""The deploy graph builder and the lowering of each layer to engine ops.

:class:`_Graph` collects ops and tensors (the Rust engine lays them out and writes the
file, ``crates/ovsw-engine/src/writer.rs``); each function below turns one layer (with
the BatchNorm and activation folded into it) into one op, reading its tensors through
the Rust core's lowering (``_core.deploy_*``). Both the hand-written lowerings of ovsw's
architectures (:mod:`ovsw.deploy._export`) and the ``torch.fx`` lowering
(:mod:`ovsw.deploy._fx`) build their ops here. The ops are documented in
:mod:`ovsw.deploy._export`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import _core
from ..nn import BinaryLayer, OvSWConv2d, OvSWLinear, _explicit_padding

__all__ = ["pack_signs"]


class _Graph:
    """Collects tensors and ops while a model is lowered; the Rust engine lays them out
    and writes the file (``ovsw_engine::writer``)."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, np.ndarray]] = []
        self.ops: list[dict] = []
        self.values = 1  # value 0 is the input

    def tensor(self, name: str, array: np.ndarray) -> str:
        if array.dtype == np.float32 or array.dtype == np.float64:
            array = np.ascontiguousarray(array, dtype=np.float32)
        elif array.dtype == np.uint64:
            array = np.ascontiguousarray(array, dtype=np.uint64)
        else:  # pragma: no cover - internal misuse
            raise TypeError(f"cannot store {array.dtype}")
        self.tensors.append((name, array))
        return name

    def op(self, op: str, name: str, x: int, **fields) -> int:
        y = self.values
        self.values += 1
        self.ops.append({"op": op, "name": name, "x": x, "y": y, **fields})
        return y

    def write(self, path: Path, metadata: dict) -> None:
        """Writes the file atomically (a temporary file renamed into place); the header
        is ``format`` and ``version``, then ``metadata``, ``tensors``, ``ops`` and
        ``output``."""
        _core.deploy_write(
            path,
            json.dumps(metadata, separators=(",", ":")),
            self.tensors,
            json.dumps(self.ops, separators=(",", ":")),
            self.values - 1,
        )


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
