"""The float64 reference of SPEC sections 1-3 in plain PyTorch ops, written from the SPEC
text alone.

Nothing here calls the Rust core (``ovsw._core``, ``ovsw.ops``, ``ovsw.nn``): the binary
convolution is built from torch ops, with small autograd Functions for the surrogate
gradients, and AGS/SAD from tensor ops. The tests hold the core to it, and ``python -m
ovsw.cuda check`` judges the CUDA kernels by it. Every function computes in the dtype of
the tensors it is given: pass float64 tensors for an exact reference (the check also runs
the elementwise formulas in the kernels' own dtype, as libtorch would).

SPEC section 1, the binary convolution (forward type "xnor"):

- :func:`sample_std` (1.1), :func:`binarize_activation` and :func:`bireal_derivative`
  (1.2), :func:`activation_grad` (1.1 and 1.2 together, the backward to ``x``),
  :func:`binarize_weight` and :func:`weight_grad_mask` (1.3), :func:`channel_abs_mean`
  and :func:`channel_alpha` (1.4).
- :func:`oracle_binary_conv2d` / :class:`OracleConv2d`: 1.1-1.5 with autograd.
- :func:`oracle_binary_linear` / :class:`OracleLinear`: the same layer around a matrix
  product (``ovsw.OvSWLinear``): per-sample normalisation over all non-batch dims,
  alpha per output feature.
- :func:`to_oracle`: a deep copy of a model with every ``ovsw.OvSWConv2d`` replaced by
  an :class:`OracleConv2d` and every ``ovsw.OvSWLinear`` by an :class:`OracleLinear`
  holding the same parameters and buffers.

SPEC sections 2 and 3, AGS and SAD:

- :func:`ags_sad_layer`: both on one layer, in place, the figures left as tensors.
- :func:`oracle_ags_sad`: the same with the figures read back as Python floats.
- :class:`OracleOvSW`: a minimal stand-in for ``ovsw.OvSW`` built on the above (with
  ``host_figures=False`` its figures stay 0-dim tensors on the device: no host read).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EPS",
    "GRAD_NORM_FLOOR",
    "WEIGHT_NORM_FLOOR",
    "ACT_W",
    "sample_std",
    "channel_abs_mean",
    "channel_alpha",
    "bireal_derivative",
    "binarize_activation",
    "activation_grad",
    "binarize_weight",
    "weight_grad_mask",
    "oracle_binary_conv2d",
    "OracleConv2d",
    "oracle_binary_linear",
    "OracleLinear",
    "to_oracle",
    "ags_sad_layer",
    "oracle_ags_sad",
    "OracleOvSW",
]

EPS = 1e-5  # SPEC 1.1 and 1.4: added to variances before the square root
GRAD_NORM_FLOOR = 1e-6  # SPEC 2: g_o = max(||G_o||, 1e-6)
WEIGHT_NORM_FLOOR = 1e-3  # SPEC 2: w_o = max(||W_o||, 1e-3)
ACT_W = ("ste", "hardtanh", "ste_v2", "hardtanhv2")  # SPEC 1.3's weight binarizers


# ---------------------------------------------------------------------------------------
# SPEC 1: the binary convolution
# ---------------------------------------------------------------------------------------
def _per_channel_view(v: Tensor, ndim: int) -> Tensor:
    """``[O]`` -> ``[O, 1, ..., 1]`` to broadcast over a weight of ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def sample_std(x: Tensor) -> Tensor:
    """SPEC 1.1: ``sqrt(Var(x_n) + 1e-5)`` per sample ``n``, the unbiased variance taken
    over every dim but the first ((C, H, W) for a convolution's input), with the first
    dim's size and the others 1 (``keepdim``); detached, a constant for autograd.
    ``x / sample_std(x)`` is ``x_hat`` in training mode."""
    dims = tuple(range(1, x.dim()))
    return torch.sqrt(x.detach().var(dim=dims, keepdim=True, unbiased=True) + EPS)


def channel_abs_mean(weight: Tensor) -> Tensor:
    """SPEC 1.3 and 1.4's ``mean_o |W|``: the mean absolute value per output channel
    (over every dim but the first), shape ``[O]``, detached."""
    return weight.detach().reshape(weight.shape[0], -1).abs().mean(dim=1)


def channel_alpha(weight: Tensor) -> Tensor:
    """SPEC 1.4 without a learnable scale, shape ``[O]``:
    ``alpha_o = mean(|(W_o - mean(W_o)) / sqrt(Var(W_o) + 1e-5)|)`` (no gradient)."""
    with torch.no_grad():
        w = weight.detach().reshape(weight.shape[0], -1)
        mu = w.mean(dim=1, keepdim=True)
        sd = torch.sqrt(w.var(dim=1, keepdim=True, unbiased=True) + EPS)
        return ((w - mu) / sd).abs().mean(dim=1)


def bireal_derivative(x_hat: Tensor) -> Tensor:
    """SPEC 1.2's surrogate derivative of ``sign``: ``d a / d x_hat = max(0, 2 - 2
    |x_hat|)`` (the Bi-Real approximation), elementwise."""
    return torch.clamp(2.0 - 2.0 * x_hat.abs(), min=0.0)


class _SignBiReal(torch.autograd.Function):
    """a = sign(x); da/dx = max(0, 2 - 2|x|) (SPEC 1.2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * bireal_derivative(x)


class _WeightSTE(torch.autograd.Function):
    """act_w "ste": w_b = sign(W); backward identity."""

    @staticmethod
    def forward(ctx, w):
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _WeightHardtanh(torch.autograd.Function):
    """act_w "hardtanh": w_b = sign(W); backward times 1[|W| < 1]."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * weight_grad_mask(w, "hardtanh").to(grad.dtype)


class _WeightSTEv2(torch.autograd.Function):
    """act_w "ste_v2": w_b = sign(W) * mean_o|W|; backward identity."""

    @staticmethod
    def forward(ctx, w):
        return torch.sign(w) * _per_channel_view(channel_abs_mean(w), w.dim())

    @staticmethod
    def backward(ctx, grad):
        return grad


class _WeightHardtanhV2(torch.autograd.Function):
    """act_w "hardtanhv2": w_b = sign(W); backward times 1[|W| < mean_o|W|]."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.sign(w)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * weight_grad_mask(w, "hardtanhv2").to(grad.dtype)


_WEIGHT_BINARIZERS = {
    "ste": _WeightSTE,
    "hardtanh": _WeightHardtanh,
    "ste_v2": _WeightSTEv2,
    "hardtanhv2": _WeightHardtanhV2,
}


def binarize_activation(x_hat: Tensor) -> Tensor:
    """SPEC 1.2 (act_a "binary"): ``a = sign(x_hat)``, with :func:`bireal_derivative` as
    its gradient under autograd."""
    return _SignBiReal.apply(x_hat)


def activation_grad(grad: Tensor, x: Tensor, std: Tensor | None) -> Tensor:
    """SPEC 1.1 and 1.2 backward: the gradient reaching ``x`` through ``a =
    sign(x / std)`` from ``grad`` (the gradient of ``a``), ``std`` a constant (SPEC 1.1):
    ``grad * max(0, 2 - 2 |x / std|) / std``; with ``std`` None (eval mode, ``x_hat =
    x``) ``grad * max(0, 2 - 2 |x|)``. Computed in the dtype of ``grad`` and ``x``."""
    x_hat = x / std if std is not None else x
    out = grad * bireal_derivative(x_hat)
    return out / std if std is not None else out


def binarize_weight(weight: Tensor, act_w: str) -> Tensor:
    """SPEC 1.3: the binarized weight ``w_b`` (``sign(W)``; "ste_v2": ``sign(W) *
    mean_o |W|``), with the binarizer's surrogate backward (:func:`weight_grad_mask`)
    under autograd."""
    try:
        fn = _WEIGHT_BINARIZERS[act_w]
    except KeyError:
        raise ValueError(f"unknown act_w {act_w!r}; expected one of {ACT_W}") from None
    return fn.apply(weight)


def weight_grad_mask(weight: Tensor, act_w: str) -> Tensor:
    """SPEC 1.3 backward: the factor the weight binarizer ``act_w`` multiplies the
    gradient of ``w_b`` by to give the gradient of ``W``, in W's shape and dtype: 1 for
    "ste" and "ste_v2", ``1[|W| < 1]`` for "hardtanh", ``1[|W| < mean_o |W|]`` for
    "hardtanhv2"."""
    w = weight.detach()
    if act_w in ("ste", "ste_v2"):
        return torch.ones_like(w)
    if act_w == "hardtanh":
        return (w.abs() < 1).to(w.dtype)
    if act_w == "hardtanhv2":
        return (w.abs() < _per_channel_view(channel_abs_mean(w), w.dim())).to(w.dtype)
    raise ValueError(f"unknown act_w {act_w!r}; expected one of {ACT_W}")


def _pair(v) -> Any:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return (v, v)
    return tuple(int(i) for i in v)


def oracle_binary_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    act_w: str,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = True,
) -> Tensor:
    """SPEC 1.1-1.5: ``conv2d(sign(x_hat), w_b, bias) * alpha`` with surrogate gradients.

    ``scale`` is the learnable ``scaling_factor`` (shape ``[O]``, gets a gradient) or
    ``None`` for the W-derived alpha (no gradient).
    """
    if training:
        # 1.1: per-sample normalisation, unbiased variance over (C, H, W); the divisor is
        # a constant for autograd.
        x_hat = x / sample_std(x)
    else:
        x_hat = x
    a = binarize_activation(x_hat)  # 1.2
    w_b = binarize_weight(weight, act_w)  # 1.3
    alpha = scale if scale is not None else channel_alpha(weight)  # 1.4
    # 1.5: zero padding pads the binarized activation with 0; the bias is scaled too.
    out = F.conv2d(a, w_b, bias, _pair(stride), _pair(padding), _pair(dilation), groups)
    return out * alpha[None, :, None, None]


class OracleConv2d(nn.Conv2d):
    """Same constructor (and parameter/buffer names) as ``ovsw.OvSWConv2d``; the
    forward is :func:`oracle_binary_conv2d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        if act_a != "binary":
            raise ValueError(f"unknown act_a {act_a!r}; expected 'binary'")
        if act_w not in ACT_W:
            raise ValueError(f"unknown act_w {act_w!r}; expected one of {ACT_W}")
        if forward_type != "xnor":
            raise ValueError(f"unknown forward_type {forward_type!r}; expected 'xnor'")
        if padding_mode != "zeros":
            raise ValueError("OracleConv2d supports only padding_mode='zeros'")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.act_a = act_a
        self.act_w = act_w
        self.forward_type = forward_type
        self.register_parameter("scaling_factor", None)
        self.register_buffer("weight_prev", None)
        self.register_buffer("tracker", None)
        if scaling_factor:
            self.init_scaling_factor()

    def init_scaling_factor(self) -> None:
        """SPEC 1.4: a learnable scale initialised to ``mean_o |W|`` of the weight now."""
        self.scaling_factor = nn.Parameter(channel_abs_mean(self.weight).clone())

    def setup_sad(self, track_ones: bool = False) -> None:
        """SPEC 3: tracker zeros (ones with ``track_ones``), ``weight_prev`` a copy of W."""
        w = self.weight.detach()
        self.tracker = torch.ones_like(w) if track_ones else torch.zeros_like(w)
        self.weight_prev = w.clone()

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Conv2d's name)
        return oracle_binary_conv2d(
            input,
            self.weight,
            self.bias,
            self.scaling_factor,
            self.act_w,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.training,
        )


def oracle_binary_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    act_w: str,
    training: bool = True,
) -> Tensor:
    """SPEC 1.1-1.5 with ``F.linear`` for the convolution: ``x`` is ``[N, *, in]``,
    normalised per sample over every dim but the first; alpha is per output feature."""
    if training:
        x_hat = x / sample_std(x)
    else:
        x_hat = x
    a = binarize_activation(x_hat)
    w_b = binarize_weight(weight, act_w)
    alpha = scale if scale is not None else channel_alpha(weight)
    return F.linear(a, w_b, bias) * alpha


class OracleLinear(nn.Linear):
    """Same constructor (and parameter/buffer names) as ``ovsw.OvSWLinear``; the forward
    is :func:`oracle_binary_linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        if act_a != "binary":
            raise ValueError(f"unknown act_a {act_a!r}; expected 'binary'")
        if act_w not in ACT_W:
            raise ValueError(f"unknown act_w {act_w!r}; expected one of {ACT_W}")
        if forward_type != "xnor":
            raise ValueError(f"unknown forward_type {forward_type!r}; expected 'xnor'")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.act_a = act_a
        self.act_w = act_w
        self.forward_type = forward_type
        self.register_parameter("scaling_factor", None)
        self.register_buffer("weight_prev", None)
        self.register_buffer("tracker", None)
        if scaling_factor:
            self.init_scaling_factor()

    init_scaling_factor = OracleConv2d.init_scaling_factor
    setup_sad = OracleConv2d.setup_sad

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's name)
        return oracle_binary_linear(
            input, self.weight, self.bias, self.scaling_factor, self.act_w, self.training
        )


def _library_class(name: str) -> type | None:
    """``ovsw.nn``'s class ``name`` where that module has been imported, else None.
    Looked up, never imported (this module runs no part of the core): a model cannot
    hold an ``ovsw.OvSWConv2d`` unless ``ovsw.nn`` was imported."""
    module = sys.modules.get("ovsw.nn")
    return getattr(module, name, None) if module is not None else None


def _is_ovsw_conv(m: nn.Module) -> bool:
    cls = _library_class("OvSWConv2d")
    return cls is not None and isinstance(m, cls)


def _is_ovsw_linear(m: nn.Module) -> bool:
    cls = _library_class("OvSWLinear")
    return cls is not None and isinstance(m, cls)


def _move_tensors(old: nn.Module, new: nn.Module) -> nn.Module:
    """The copy's own tensors (already deep-copied) move over unchanged."""
    new.weight = old.weight
    new.bias = old.bias
    new.scaling_factor = old.scaling_factor
    new.tracker = old.tracker
    new.weight_prev = old.weight_prev
    new.train(old.training)
    return new


def to_oracle(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every ``ovsw.OvSWConv2d`` (the model itself
    included) is an :class:`OracleConv2d`, and every ``ovsw.OvSWLinear`` an
    :class:`OracleLinear`, with the same parameters and buffers (weight, bias,
    scaling_factor, tracker, weight_prev) and training mode."""

    def convert(conv: nn.Module) -> nn.Module:
        if _is_ovsw_linear(conv):
            new = OracleLinear(
                conv.in_features,
                conv.out_features,
                bias=conv.bias is not None,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
                act_a=conv.act_a,
                act_w=conv.act_w,
                forward_type=conv.forward_type,
            )
            return _move_tensors(conv, new)
        new = OracleConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            act_a=conv.act_a,
            act_w=conv.act_w,
            forward_type=conv.forward_type,
        )
        return _move_tensors(conv, new)

    copied = copy.deepcopy(model)
    if _is_ovsw_conv(copied) or _is_ovsw_linear(copied):
        return convert(copied)
    targets = [name for name, m in copied.named_modules() if _is_ovsw_conv(m) or _is_ovsw_linear(m)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, convert(getattr(parent, child)))
    return copied


# ---------------------------------------------------------------------------------------
# SPEC 2 and 3: AGS and SAD
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def ags_sad_layer(
    grad: Tensor,
    weight: Tensor,
    tracker: Tensor | None,
    weight_prev: Tensor | None,
    *,
    enable_ags: bool,
    delta: float,
    enable_dampen: bool,
    dampen_weight: float,
    track_momentum: float,
    track_threshold: float,
) -> tuple[Tensor | None, Tensor | None]:
    """AGS (SPEC 2) then SAD (SPEC 3) on one layer, in place on ``grad``, ``tracker``
    and ``weight_prev``.

    Returns ``(r, mask)``: the per-channel ratios ``r_o = g_o / w_o`` (shape ``[O]``)
    and the silent mask ``tracker < track_threshold`` (bool, the weight's shape), each
    ``None`` where its part is disabled. ``r.mean()`` is the layer's ``ags_ratio`` and
    ``mask.mean()`` its ``silent_ratio``. It computes in the dtype of the tensors it is
    given (float64 copies give the exact figures) and reads nothing back to the host: the
    figures stay tensors on the tensors' device.
    """
    r = mask = None
    o = weight.shape[0]
    if enable_ags:
        g = grad.reshape(o, -1).norm(p=2, dim=1).clamp_min(GRAD_NORM_FLOOR)
        w = weight.reshape(o, -1).norm(p=2, dim=1).clamp_min(WEIGHT_NORM_FLOOR)
        r = g / w
        factor = torch.where(r < delta, delta * w / g, torch.ones_like(r))
        grad.mul_(factor.reshape(o, *([1] * (weight.dim() - 1))))
    if enable_dampen:
        if tracker is None or weight_prev is None:
            raise ValueError("SAD needs tracker and weight_prev")
        m = track_momentum
        flipped = (torch.sign(weight) != torch.sign(weight_prev)).to(tracker.dtype)
        tracker.mul_(m).add_(flipped * (1.0 - m))
        mask = tracker < track_threshold
        grad.add_(dampen_weight * mask.to(weight.dtype) * weight)
        weight_prev.copy_(weight)
    return r, mask


def oracle_ags_sad(
    grad: Tensor,
    weight: Tensor,
    tracker: Tensor | None,
    weight_prev: Tensor | None,
    *,
    enable_ags: bool,
    delta: float,
    enable_dampen: bool,
    dampen_weight: float,
    track_momentum: float,
    track_threshold: float,
) -> tuple[float | None, float | None]:
    """AGS (SPEC 2) then SAD (SPEC 3) on one layer, in place on ``grad``, ``tracker``
    and ``weight_prev``. Returns ``(ags_ratio, silent_ratio)``, ``None`` where disabled.

    The formula is :func:`ags_sad_layer`; this reads its two figures back to the host.
    """
    r, mask = ags_sad_layer(
        grad,
        weight,
        tracker,
        weight_prev,
        enable_ags=enable_ags,
        delta=delta,
        enable_dampen=enable_dampen,
        dampen_weight=dampen_weight,
        track_momentum=track_momentum,
        track_threshold=track_threshold,
    )
    ags_ratio = None if r is None else float(r.double().mean())
    silent_ratio = None if mask is None else float(mask.double().mean())
    return ags_ratio, silent_ratio


def _binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (OracleConv2d, OracleLinear)) or _is_ovsw_conv(m) or _is_ovsw_linear(m)
    ]


class OracleOvSW:
    """A minimal ``ovsw.OvSW``: ``step()`` applies :func:`oracle_ags_sad` to the weight
    gradient of every binary layer (``OvSWConv2d``, ``OvSWLinear``, :class:`OracleConv2d`
    or :class:`OracleLinear`), then steps the wrapped optimizer.

    With ``host_figures=False`` each layer's figures stay 0-dim float64 tensors on the
    weights' device (the same formula, no host read per layer), as ``ovsw.OvSW`` keeps
    them: a like-for-like baseline for timing on a GPU."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        enable_ags: bool = False,
        delta: float = 0.01,
        enable_dampen: bool = False,
        dampen_weight: float = 0.0,
        track_momentum: float = 0.999,
        track_threshold: float = 1e-4,
        track_ones: bool = False,
        host_figures: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self.host_figures = host_figures
        self.enable_ags = enable_ags
        self.delta = delta
        self.enable_dampen = enable_dampen
        self.dampen_weight = dampen_weight
        self.track_momentum = track_momentum
        self.track_threshold = track_threshold
        self.track_ones = track_ones
        self.layers = _binary_layers(model)
        self._stats: list[dict[str, Any]] = []
        if enable_dampen:
            for _, layer in self.layers:
                if layer.tracker is None or layer.weight_prev is None:
                    w = layer.weight.detach()
                    layer.tracker = torch.ones_like(w) if track_ones else torch.zeros_like(w)
                    layer.weight_prev = w.clone()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def apply_ags_sad(self) -> list[dict[str, Any]]:
        self._stats = []
        for name, layer in self.layers:
            ags = silent = None
            if layer.weight.grad is not None:
                step = oracle_ags_sad if self.host_figures else ags_sad_layer
                ags, silent = step(
                    layer.weight.grad,
                    layer.weight,
                    layer.tracker,
                    layer.weight_prev,
                    enable_ags=self.enable_ags,
                    delta=self.delta,
                    enable_dampen=self.enable_dampen,
                    dampen_weight=self.dampen_weight,
                    track_momentum=self.track_momentum,
                    track_threshold=self.track_threshold,
                )
                if not self.host_figures:  # (r, mask) -> their means, on the device
                    ags = None if ags is None else ags.double().mean()
                    silent = None if silent is None else silent.double().mean()
            self._stats.append({"name": name, "ags_ratio": ags, "silent_ratio": silent})
        return self._stats

    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_ags_sad()
        self.optimizer.step()
        return loss

    def stats(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._stats]
