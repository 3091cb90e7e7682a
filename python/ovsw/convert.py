"""Turn a network you already have into a binary one, and see what it weighs.

>>> import torchvision, ovsw
>>> model = ovsw.binarize(torchvision.models.resnet18(), act_w="ste")
>>> ovsw.summary(model)

:func:`binarize` swaps ``nn.Conv2d`` (and, when asked, ``nn.Linear``) layers for
:class:`~ovsw.OvSWConv2d` / :class:`~ovsw.OvSWLinear` carrying the same parameters;
:func:`summary` prints a table of every layer's parameters at 1 bit against 32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from torch import nn

from . import _core
from .nn import BinaryLayer, OvSWConv2d, OvSWLinear, _check_fan_in, _explicit_padding

__all__ = ["binarize", "summary", "ModelSummary", "LayerRow", "BINARIZE_OPTIONS"]

#: The binarizer options :func:`binarize` passes to every layer it creates.
BINARIZE_OPTIONS = ("act_a", "act_w", "scaling_factor", "forward_type")

Selector = Union[str, Iterable[str], Callable[[str, nn.Module], bool]]


def _is_conv(m: nn.Module) -> bool:
    # Exactly nn.Conv2d: a subclass may have its own forward, which a swap would lose.
    return type(m) is nn.Conv2d


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = [k for k in options if k not in BINARIZE_OPTIONS]
    if unknown:
        raise ValueError(
            f"binarize: unknown option {unknown[0]!r}; the options are "
            + ", ".join(BINARIZE_OPTIONS)
        )
    if "scaling_factor" in options and not isinstance(options["scaling_factor"], bool):
        raise ValueError(
            f"binarize: scaling_factor must be True or False, got {options['scaling_factor']!r}"
        )
    # Validates the names now, before the model is touched (ValueError naming the value).
    _core.ConvSpec(**{k: options[k] for k in ("act_a", "act_w", "forward_type") if k in options})
    return options


def _select(
    model: nn.Module, selector: Selector, candidates: dict[str, nn.Module], what: str
) -> set[str]:
    """The candidate names ``selector`` picks: a predicate ``(name, module) -> bool``, or
    names (one string or several), each a candidate or a module holding some."""
    if callable(selector):
        return {n for n, m in candidates.items() if selector(n, m)}
    names = [selector] if isinstance(selector, str) else list(selector)
    modules = dict(model.named_modules())
    picked: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"binarize: {what} names must be strings, got {name!r}")
        if name not in modules:
            raise ValueError(f"binarize: {what} names {name!r}, which is not a module of the model")
        inside = {n for n in candidates if n == name or n.startswith(name + ".") or name == ""}
        if not inside:
            kind = type(modules[name]).__name__
            hint = " (pass linear=True to convert nn.Linear layers)" if kind == "Linear" else ""
            raise ValueError(
                f"binarize: {what} names {name!r}, a {kind} with no layer binarize converts{hint}"
            )
        picked |= inside
    return picked


def _first_and_last(model: nn.Module) -> tuple[str | None, str | None]:
    """The first ``nn.Conv2d`` and the last classifier layer (the last ``nn.Linear``, or
    the last ``nn.Conv2d`` in a model without one), in module order."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = convs[0] if convs else None
    last = linears[-1] if linears else (convs[-1] if convs else None)
    return first, last


def _binary_twin(name: str, layer: nn.Module, options: dict[str, Any]) -> BinaryLayer:
    """The OvSW layer for ``layer``, holding its very parameters."""
    if not options.get("scaling_factor", False):
        _check_fan_in(layer, f"binarize: {name!r}")
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ValueError(
                f"binarize: {name!r} has padding_mode={layer.padding_mode!r}; a binary conv "
                "pads with zeros only (exclude the layer to keep it full precision)"
            )
        try:
            _explicit_padding(layer)
        except ValueError as e:
            raise ValueError(f"binarize: {name!r}: {e}") from None
        new: BinaryLayer = OvSWConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            device="meta",  # no init work: the parameters are replaced below
            **{k: v for k, v in options.items() if k != "scaling_factor"},
        )
    else:
        new = OvSWLinear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device="meta",
            **{k: v for k, v in options.items() if k != "scaling_factor"},
        )
    new.weight = layer.weight
    new.bias = layer.bias
    new.train(layer.training)
    if options.get("scaling_factor", False):
        new.init_scaling_factor()
    return new


def binarize(
    model: nn.Module,
    *,
    linear: bool = False,
    keep_first: bool = True,
    keep_last: bool = True,
    layers: Selector | None = None,
    exclude: Selector | None = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Convert ``model`` into a binary network: every ``nn.Conv2d`` becomes an
    :class:`~ovsw.OvSWConv2d`, and with ``linear=True`` every ``nn.Linear`` an
    :class:`~ovsw.OvSWLinear`, holding the original layer's parameters (weight and bias;
    same geometry, device and dtype).

    By the binary-network convention the model's first conv and its last classifier
    stay full precision. Layers are matched by exact type (a subclass of ``nn.Conv2d``
    may have its own forward, which a swap would lose); forward hooks on a converted
    layer do not carry over.

    Args:
        model: any ``nn.Module``.
        linear: also convert ``nn.Linear`` layers.
        keep_first: keep the first ``nn.Conv2d`` (in module order) full precision.
        keep_last: keep the last classifier full precision: the last ``nn.Linear``, or
            the last ``nn.Conv2d`` in a model without one.
        layers: convert only these: a module name or names (a name of a container
            selects the layers inside it, ``""`` the whole model), or a predicate
            ``(name, module) -> bool``. ``keep_first``/``keep_last`` still apply; naming
            a layer they keep is an error.
        exclude: names or a predicate, as ``layers``, of layers to keep full precision.
        inplace: convert ``model`` itself; by default a deep copy is converted and
            ``model`` is left as it was.
        **options: the binarizer options of every converted layer: ``act_a``, ``act_w``,
            ``scaling_factor`` (a learnable scale, initialised from the copied weight),
            ``forward_type``, as :class:`~ovsw.OvSWConv2d` takes them.

    Returns:
        The converted model (``model`` itself with ``inplace=True``).

    Raises:
        ValueError: an unknown option or option value, a name that is not a module of
            the model (or holds no convertible layer, or is kept by ``keep_first``/
            ``keep_last``), a layer that cannot be binarized (``padding_mode`` other
            than zeros, or one weight per output channel without
            ``scaling_factor=True``), or nothing left to convert.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"binarize expects a torch.nn.Module, got {type(model).__name__}")
    options = _check_options(dict(options))
    candidates = {
        n: m for n, m in model.named_modules() if _is_conv(m) or (linear and _is_linear(m))
    }
    chosen = set(candidates)
    if layers is not None:
        chosen = _select(model, layers, candidates, "layers")
    first, last = _first_and_last(model)
    kept = {n for n, keep in ((first, keep_first), (last, keep_last)) if keep and n is not None}
    if layers is not None and not callable(layers):
        clash = sorted(chosen & kept)
        if clash:
            flag = "keep_first" if clash[0] == first else "keep_last"
            raise ValueError(
                f"binarize: layers names {clash[0]!r}, which {flag}=True keeps full "
                f"precision; pass {flag}=False to convert it"
            )
    chosen -= kept
    if exclude is not None:
        excluded_candidates = dict(candidates)
        chosen -= _select(model, exclude, excluded_candidates, "exclude")
    if not chosen:
        kinds = "nn.Conv2d or nn.Linear" if linear else "nn.Conv2d"
        raise ValueError(
            f"binarize: the model ({type(model).__name__}) has no {kinds} layer to convert"
            + (
                f" besides the ones kept full precision ({', '.join(sorted(kept))})"
                if kept & set(candidates)
                else ""
            )
        )
    target = model if inplace else copy.deepcopy(model)
    order = [n for n in candidates if n in chosen]
    # A module reachable under several names is converted once and replaced at each.
    twins: dict[int, BinaryLayer] = {}
    for name in order:
        old = target.get_submodule(name)
        twins[id(old)] = _binary_twin(name, old, options)
    for parent in target.modules():
        # _modules, not named_children(): that skips a child registered twice.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in twins:
                setattr(parent, child_name, twins[id(child)])
    return target


# -- summary -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    """One layer of :func:`summary`: its parameters and their size deployed."""

    name: str
    type: str
    binary: bool
    params: int
    #: parameters stored at 1 bit (a binary layer's weight).
    binary_params: int

    @property
    def float_params(self) -> int:
        return self.params - self.binary_params

    @property
    def bits(self) -> int:
        """Size with binary weights at 1 bit and everything else at 32."""
        return self.binary_params + 32 * self.float_params

    @property
    def float_bits(self) -> int:
        """Size with every parameter at 32 bits."""
        return 32 * self.params


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`summary` found; ``str()`` is the table it prints."""

    model: str
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def binary_params(self) -> int:
        return sum(r.binary_params for r in self.rows)

    @property
    def bits(self) -> int:
        return sum(r.bits for r in self.rows)

    @property
    def float_bits(self) -> int:
        return sum(r.float_bits for r in self.rows)

    def __str__(self) -> str:
        header = ("Layer", "Type", "Precision", "Params", "1-bit", "32-bit", "KiB", "KiB fp32")
        lines = [
            (
                r.name,
                r.type,
                "binary" if r.binary else "float",
                f"{r.params:,}",
                f"{r.binary_params:,}",
                f"{r.float_params:,}",
                _kib(r.bits),
                _kib(r.float_bits),
            )
            for r in self.rows
        ]
        total = (
            "Total",
            "",
            "",
            f"{self.params:,}",
            f"{self.binary_params:,}",
            f"{self.params - self.binary_params:,}",
            _kib(self.bits),
            _kib(self.float_bits),
        )
        widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, total)]

        def fmt(cells) -> str:
            left = [str(c).ljust(w) for c, w in zip(cells[:3], widths[:3])]
            right = [str(c).rjust(w) for c, w in zip(cells[3:], widths[3:])]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        ratio = self.float_bits / self.bits if self.bits else float("nan")
        share = self.binary_params / self.params if self.params else 0.0
        out = [f"{self.model} summary", rule, fmt(header), rule]
        out += [fmt(c) for c in lines]
        out += [rule, fmt(total), rule]
        out.append(
            f"Binary parameters: {self.binary_params:,} of {self.params:,} ({share:.1%}); "
            f"size {_kib(self.bits)} KiB at 1 bit against {_kib(self.float_bits)} KiB "
            f"at 32 bits ({ratio:.2f}x smaller)"
        )
        return "\n".join(out)


def _kib(bits: int) -> str:
    return f"{bits / 8 / 1024:,.2f}"


def summary(model: nn.Module, print_fn: Callable[[str], Any] | None = print) -> ModelSummary:
    """Print a Larq-style table of ``model``: every layer that holds parameters, binary
    or float, its parameter count (split into 1-bit and 32-bit), its size with binary
    weights at 1 bit against all 32-bit, and the totals.

    A binary layer's weight counts at 1 bit; its bias and ``scaling_factor`` and every
    parameter of other layers at 32. Buffers (BatchNorm statistics, SAD state) are not
    parameters and are not counted; a parameter shared by several layers counts once.

    Args:
        model: any ``nn.Module``.
        print_fn: where the table goes (``None``: nowhere).

    Returns:
        The :class:`ModelSummary` (``str()`` of it is the table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"summary expects a torch.nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    rows = []
    for name, m in model.named_modules():
        own = [p for p in m._parameters.values() if p is not None and id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        binary = isinstance(m, BinaryLayer)
        weight = m._parameters.get("weight")
        rows.append(
            LayerRow(
                name=name or "(model)",
                type=type(m).__name__,
                binary=binary,
                params=sum(p.numel() for p in own),
                binary_params=weight.numel()
                if binary and weight is not None and any(p is weight for p in own)
                else 0,
            )
        )
    result = ModelSummary(type(model).__name__, rows)
    if print_fn is not None:
        print_fn(str(result))
    return result
