"""Deploy lowering of any network through its ``torch.fx`` graph.

ovsw's own architectures have hand-written lowerings (:mod:`ovsw.deploy._export`); any
other model, for instance one :func:`ovsw.binarize` converted from torchvision, is
lowered here. The model is traced with ``torch.fx`` (ovsw's binary layers and the
``torch.nn`` layers as leaves), shapes are propagated from one example input of the
export's input size, and the graph is walked from its output, each node becoming an
engine op on demand. Blocks fold into one op as the hand-written lowerings fold them:

- a conv (``nn.Conv2d`` to ``conv2d``, :class:`~ovsw.OvSWConv2d` to ``bconv2d``) or an
  :class:`~ovsw.OvSWLinear` (a ``bconv2d`` with a 1x1 kernel on the ``[N, 1, 1, C]``
  features), with the BatchNorm that follows it, the residual added to it (binary
  layers only: the engine adds residuals there) and the activation after that;
- a BatchNorm on its own becomes ``affine``; an activation after an op that cannot
  take it, an identity ``affine`` with that activation;
- ReLU lowers as PReLU with slope 0, ReLU6 as hardtanh(0, 6); Dropout and Identity
  vanish (eval mode); ``AdaptiveAvgPool2d`` becomes a global average pool for output
  1, else the fixed average pool it is at the export's input size (the file is then
  meant for that size); ``torch.flatten(x, 1)`` and ``x.view(N, -1)`` become ``flatten``.

Anything else (SiLU, sigmoid, elementwise products, concatenation, ...) has no engine
op: the export stops with a ``TypeError`` naming the first such node in graph order.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..nn import BinaryLayer, OvSWConv2d, OvSWLinear
from . import _ops

__all__ = ["lower"]

_ACTS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu)
_FLATTENS = (torch.flatten,)


class _Tracer(fx.Tracer):
    """Keeps ovsw's binary layers whole (their forward calls a custom op)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, BinaryLayer) or super().is_leaf_module(m, qualname)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} (module '{node.target}')"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function {name} (graph node '{node.name}')"
    if node.op == "call_method":
        return f"Tensor.{node.target} (graph node '{node.name}')"
    return f"{node.op} '{node.target}' (graph node '{node.name}')"


class _Lowering:
    def __init__(self, g: _ops._Graph, gm: fx.GraphModule) -> None:
        self.g = g
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.values: dict[fx.Node, int] = {}
        self.names: set[str] = set()
        self.kinds = {n: self._kind(n) for n in gm.graph.nodes}
        for node in gm.graph.nodes:  # the first unsupported node, in graph order
            if self.kinds[node] is None:
                raise TypeError(
                    f"no deploy lowering for {_describe(node, self.modules)}; the engine "
                    "runs convs and binary layers (with BatchNorm, residual additions and "
                    "ReLU/ReLU6/Hardtanh/PReLU folded in), BatchNorm, max/average pooling, "
                    "flatten and linear layers"
                )

    # -- classification -------------------------------------------------------------
    def _module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def _kind(self, node: fx.Node) -> str | None:
        if node.op in ("placeholder", "output"):
            return node.op
        if node.op == "call_module":
            m = self._module(node)
            if isinstance(m, OvSWConv2d):
                return "bconv"
            if isinstance(m, OvSWLinear):
                return "blinear"
            if isinstance(m, nn.Conv2d) and not isinstance(m, BinaryLayer):
                return "conv"
            if isinstance(m, nn.Linear) and not isinstance(m, BinaryLayer):
                return "linear"
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                return "bn"
            if isinstance(m, _ACTS):
                return "act"
            if isinstance(m, _IDENTITIES):
                return "identity"
            if isinstance(m, _POOLS):
                return "pool"
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return "adaptive_pool"
            if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                return "flatten"
            return None
        if node.op == "call_function":
            if node.target in _ADDS and len(node.args) == 2 and not node.kwargs:
                return "add"
            if node.target in _RELUS:
                return "act"
            if node.target is F.dropout:
                return "identity"
            if node.target in _FLATTENS:
                return "flatten"
            if node.target is F.adaptive_avg_pool2d:
                return "adaptive_pool"
            return None
        if node.op == "call_method":
            if node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs:
                return "add"
            if node.target in ("relu", "relu_"):
                return "act"
            if node.target in ("view", "reshape", "flatten") and self._is_flatten(node):
                return "flatten"
            return None
        return None

    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise TypeError(f"no deploy lowering for {_describe(node, self.modules)}: not a tensor")
        return tuple(meta.shape)

    def _is_flatten(self, node: fx.Node) -> bool:
        src = node.args[0]
        if not isinstance(src, fx.Node) or "tensor_meta" not in src.meta:
            return False
        before, after = self._shape(src), self._shape(node)
        return len(after) == 2 and after[0] == before[0] and len(before) in (2, 4)

    # -- lowering -------------------------------------------------------------------------
    def _name(self, node: fx.Node) -> str:
        name = str(node.target) if node.op == "call_module" else node.name
        if name in self.names:
            name = node.name
        self.names.add(name)
        return name

    def value(self, node: fx.Node) -> int:
        if node not in self.values:
            self.values[node] = self._emit(node)
        return self.values[node]

    def _arg(self, node: fx.Node) -> fx.Node:
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            raise TypeError(f"no deploy lowering for {_describe(node, self.modules)} on a constant")
        return arg

    def _single_use(self, node: fx.Node) -> bool:
        return len(node.users) == 1

    def _act_module(self, node: fx.Node) -> nn.Module:
        if node.op == "call_module":
            return self._module(node)
        return nn.ReLU()

    def _emit(self, node: fx.Node) -> int:
        kind = self.kinds[node]
        if kind == "placeholder":
            if self.values:
                raise TypeError("deploy supports models with one input")
            return 0
        if kind == "identity":
            return self.value(self._arg(node))
        if kind == "act":
            inner = self._arg(node)
            act = self._act_module(node)
            if self._single_use(inner) and self.kinds[inner] in (
                "conv",
                "bconv",
                "blinear",
                "bn",
                "add",
            ):
                return self._block(inner, act, self._name(inner))
            return self._identity_affine(inner, act, self._name(node))
        if kind in ("conv", "bconv", "blinear", "bn", "add"):
            return self._block(node, None, self._name(node))
        if kind == "pool":
            return _ops._pool(
                self.g, self.value(self._arg(node)), self._name(node), self._module(node)
            )
        if kind == "adaptive_pool":
            return self._adaptive_pool(node)
        if kind == "flatten":
            src = self._arg(node)
            if len(self._shape(src)) == 2:
                return self.value(src)
            return self.g.op("flatten", self._name(node), self.value(src))
        if kind == "linear":
            self._check_features(node)
            return _ops._linear(
                self.g, self.value(self._arg(node)), self._name(node), self._module(node)
            )
        raise TypeError(f"no deploy lowering for {_describe(node, self.modules)}")

    def _check_features(self, node: fx.Node) -> None:
        shape = self._shape(self._arg(node))
        if len(shape) != 2:
            raise TypeError(
                f"no deploy lowering for {_describe(node, self.modules)} on a "
                f"{len(shape)}-D input: the engine runs linear layers on [N, features]"
            )

    def _identity_affine(self, inner: fx.Node, act: nn.Module, name: str) -> int:
        shape = self._shape(inner)
        channels = shape[1] if len(shape) == 4 else shape[-1]
        x = self.value(inner)
        return self.g.op(
            "affine",
            name,
            x,
            channels=channels,
            scale=self.g.tensor(name + ".scale", np.ones(channels)),
            shift=self.g.tensor(name + ".shift", np.zeros(channels)),
            **_ops._act_fields(self.g, name, act),
        )

    def _is_binary_block(self, node: fx.Node) -> bool:
        if self.kinds[node] in ("bconv", "blinear"):
            return True
        if self.kinds[node] == "bn":
            inner = node.args[0]
            return (
                isinstance(inner, fx.Node)
                and self._single_use(inner)
                and self.kinds[inner] in ("bconv", "blinear")
            )
        return False

    def _block(self, node: fx.Node, act: nn.Module | None, name: str) -> int:
        """``act(bn(layer(x)) + residual)``, with each part optional, as one op."""
        residual = None
        if self.kinds[node] == "add":
            a, b = node.args
            pairs = [(a, b), (b, a)]
            main = next(
                (
                    (m, r)
                    for m, r in pairs
                    if isinstance(m, fx.Node)
                    and isinstance(r, fx.Node)
                    and self._single_use(m)
                    and self._is_binary_block(m)
                ),
                None,
            )
            if main is None:
                raise TypeError(
                    f"no deploy lowering for the addition {_describe(node, self.modules)}: "
                    "the engine adds a residual only to the output of a binary layer "
                    "(OvSWConv2d or OvSWLinear, with its BatchNorm)"
                )
            node, residual = main
            name = self._name(node)
        bn = None
        if self.kinds[node] == "bn":
            inner = self._arg(node)
            if self._single_use(inner) and self.kinds[inner] in ("conv", "bconv", "blinear"):
                bn = self._module(node)
                node = inner
                name = self._name(node)
            else:
                return _ops._affine(self.g, self.value(inner), name, self._module(node), act)
        layer = self._module(node)
        kind = self.kinds[node]
        if kind == "blinear":
            self._check_features(node)
        x = self.value(self._arg(node))
        r = self.value(residual) if residual is not None else None
        if kind == "conv":
            return _ops._fp_conv(self.g, x, name, layer, bn, act)
        if kind == "bconv":
            return _ops._bconv(self.g, x, name, layer, bn, act, residual=r)
        return _ops._blinear(self.g, x, name, layer, bn, act, residual=r)

    def _adaptive_pool(self, node: fx.Node) -> int:
        src = self._arg(node)
        n, c, h, w = self._shape(src)
        _, _, oh, ow = self._shape(node)
        x = self.value(src)
        name = self._name(node)
        if (oh, ow) == (1, 1):
            return _ops._global_pool(self.g, x, name)
        if (oh, ow) == (h, w):
            return x
        if h % oh or w % ow:
            raise TypeError(
                f"no deploy lowering for {_describe(node, self.modules)}: at this input "
                f"size its {h}x{w} input is not a multiple of its {oh}x{ow} output"
            )
        kernel = [h // oh, w // ow]
        return self.g.op(
            "avgpool",
            name,
            x,
            kernel=kernel,
            stride=kernel,
            padding=[0, 0],
            ceil_mode=False,
            count_include_pad=True,
        )


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise TypeError(
        f"no deploy lowering for {type(model).__name__}: it has no nn.Conv2d to read the "
        "input channels from"
    )


def lower(g: _ops._Graph, model: nn.Module, height: int, width: int) -> int:
    """Lower ``model`` (eval mode) into ``g``; returns the input channel count."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # noqa: BLE001 (any tracing failure is the same user message)
        raise TypeError(
            f"no deploy lowering for {type(model).__name__}: torch.fx cannot trace it ({e})"
        ) from e
    first = _first_conv(model)
    dtype = first.weight.dtype
    example = torch.zeros(1, first.in_channels, height, width, dtype=dtype)
    ShapeProp(gm).propagate(example)
    lowering = _Lowering(g, gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise TypeError("deploy supports models with one tensor output")
    value = lowering.value(result)
    if value != g.values - 1 or value == 0:
        raise TypeError("deploy supports models whose output is computed by their last op")
    return first.in_channels
