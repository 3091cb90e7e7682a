"""The ovsw ops, registered with ``torch.library`` in the ``ovsw`` namespace.

Each op is a thin shell over a function of the Rust core (``ovsw._core``), which does
the math; registering them makes ovsw's layers and optimizer first-class PyTorch ops:
``torch.compile(model, fullgraph=True)`` traces them without a graph break,
``torch.export`` records them in the exported program, and FakeTensor tracing runs
their fake (meta) implementations here instead of reaching Rust with tensors that have
no storage. ``OvSWConv2d``, ``OvSWLinear`` and ``OvSW`` call them; you rarely need to.

Schemas (``str(torch.ops.ovsw.<name>.default._schema)``; the tests hold them to this
text)::

    ovsw::binary_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? scale,
        str act_w, SymInt[] stride, SymInt[] padding, SymInt[] dilation,
        SymInt groups, bool training, ScalarType? autocast_dtype)
        -> (Tensor, Tensor, Tensor, Tensor)
    ovsw::binary_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight,
        bool has_bias, Tensor? scale, Tensor std, Tensor alpha, Tensor conv_out,
        str act_w, SymInt[] stride, SymInt[] padding, SymInt[] dilation,
        SymInt groups, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)
    ovsw::binary_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? scale,
        str act_w, bool training, ScalarType? autocast_dtype)
        -> (Tensor, Tensor, Tensor, Tensor)
    ovsw::binary_linear_backward(Tensor grad_y, Tensor x, Tensor weight,
        bool has_bias, Tensor? scale, Tensor std, Tensor alpha, Tensor product,
        str act_w, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)
    ovsw::ags_sad_step(Tensor(a0!)[] grads, Tensor[] weights,
        Tensor(a2!)[] trackers, Tensor(a3!)[] weight_prevs, PyObject config) -> Tensor

- ``binary_conv2d`` is SPEC section 1: it returns ``(y, std, alpha, conv_out)``, the
  layer output and what its backward needs. ``scale`` is the learnable
  ``scaling_factor`` (``None``: alpha is derived from W). ``stride``, ``padding`` and
  ``dilation`` have two entries. Autograd is registered: the gradients of ``x``,
  ``weight``, ``bias`` and ``scale`` flow through ``y`` and come from
  ``binary_conv2d_backward``, which returns them in that order.
- ``autocast_dtype`` is the dtype the convolution (or product) runs in under
  ``torch.autocast`` (:func:`autocast_dtype` of the input, ``None`` without autocast;
  the binarizers, std and scale stay in the operands' dtypes). The op sets autocast
  to it around the core call, so a traced graph runs as it was traced.
- ``binary_linear`` is the same layer around a matrix product (``x`` is
  ``[N, *, in]``, ``weight`` ``[out, in]``); it returns ``(y, std, alpha, product)``.
- A custom op cannot return ``None``: an output that a call lacks is an *absent
  marker*, a 1-D tensor with zero elements: ``std`` in eval mode, ``alpha`` when
  ``scale`` is given, ``conv_out``/``product`` (the output before scaling, kept only
  for a learnable scale's gradient) otherwise, and every gradient whose ``needs``
  entry is false. The absent ``conv_out``/``product`` still carries the dtype the
  convolution or product ran in (it differs from the input's under ``torch.autocast``).
- ``ags_sad_step`` is SPEC sections 2 and 3 on every binary layer at once, in place on
  ``grads``, ``trackers`` and ``weight_prevs`` (pass empty ``trackers`` and
  ``weight_prevs`` lists when SAD is off). It returns the per-layer figures, a float64
  ``[L, 2]`` tensor on the weights' device (column 0 the mean AGS ratio, column 1 the
  silent fraction; NaN where that part is disabled). ``config`` is an
  :class:`OvSWConfig`, the settings as the core built and validated them once (a
  constant opaque object: ``torch.compile`` treats it as a constant and guards on
  its equality); the op hands it to the core as it is.
- ``act_w`` is one of ``_core.act_w_names()``. The activation binarizer and the forward
  type have one choice each (``"binary"``, ``"xnor"``), so they are not arguments.
"""

from __future__ import annotations

import contextlib
from typing import Optional  # noqa: UP035 (torch.library reads the annotations)

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _core

# torch.library's opaque objects (the OvSW config below) changed names in torch 2.14; the
# old names still work there but log a deprecation warning at every import of ovsw.
try:  # torch >= 2.14
    from torch._custom_class_base import CustomClassBase as _OpaqueBase
    from torch._library.opaque_object import register_custom_class as _register_opaque

    _CONSTANT = "constant"
except ImportError:  # torch 2.11 to 2.13
    from torch._library.opaque_object import register_opaque_type as _register_opaque
    from torch._opaque_base import OpaqueBase as _OpaqueBase

    _CONSTANT = "value"

__all__ = [
    "autocast_dtype",
    "binary_conv2d",
    "binary_conv2d_backward",
    "binary_linear",
    "binary_linear_backward",
    "ags_sad_step",
    "OvSWConfig",
]

_NO_MUTATION: tuple[str, ...] = ()


def _absent(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The absent marker (a 1-D tensor of zero elements) on ``like``'s device."""
    return like.new_empty((0,), dtype=dtype)


def _present(output: Tensor, needed: bool) -> Tensor | None:
    return output if needed else None


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matrix products in on ``x``'s device, or
    ``None`` where autocast is off: what the layers pass as ``autocast_dtype``."""
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _autocast(x: Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast exactly as the op was asked to run, whatever the caller's state (a
    compiled graph runs its ops without the autocast context it was traced in)."""
    device = x.device.type
    if device not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(device, enabled=False)
    return torch.autocast(device, dtype=dtype)


def _check_devices(x: Tensor, **others: Tensor | None) -> None:
    """The core's device check, for the fake implementations (a meta tensor among the
    inputs sends the call to them: the dispatcher picks the meta kernel)."""
    for what, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(
                f"{what} is on {t.device} but the input is on {x.device}; move them to one device"
            )


def _autocast_operands(dtype: torch.dtype | None, *tensors: Tensor | None) -> list:
    """The operands of the core's convolution or product as autocast hands them to it
    (floating operands other than float64 in ``dtype``): for the fake implementations,
    which run below autocast's dispatch key."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors]


# -- the binary convolution ----------------------------------------------------------------
@torch.library.custom_op("ovsw::binary_conv2d", mutates_args=_NO_MUTATION)
def binary_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    scale: Optional[Tensor],  # noqa: UP045
    act_w: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    autocast_dtype: Optional[torch.dtype],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The binary convolution (SPEC 1): ``(y, std, alpha, conv_out)``."""
    with _autocast(x, autocast_dtype):
        return _core.binary_conv2d_forward(
            x, weight, bias, scale, act_w, stride, padding, dilation, groups, training
        )


@binary_conv2d.register_fake
def _binary_conv2d_fake(
    x, weight, bias, scale, act_w, stride, padding, dilation, groups, training, autocast_dtype
):
    # Shapes and dtypes by the same libtorch rules the core's convolution follows
    # (autocast included): the sign of x convolved with the binarized weight, scaled.
    _check_devices(x, weight=weight, bias=bias, scaling_factor=scale)
    operands = _autocast_operands(autocast_dtype, x, weight, bias)
    conv_out = F.conv2d(*operands, stride, padding, dilation, groups)
    return _fake_layer_outputs(x, weight, scale, conv_out, training, (1, -1, 1, 1))


@torch.library.custom_op("ovsw::binary_conv2d_backward", mutates_args=_NO_MUTATION)
def binary_conv2d_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    scale: Optional[Tensor],  # noqa: UP045
    std: Tensor,
    alpha: Tensor,
    conv_out: Tensor,
    act_w: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(x, weight, bias, scale)``; absent where ``needs`` is false."""
    return _core.binary_conv2d_backward(
        grad_y,
        x,
        weight,
        has_bias,
        scale,
        std,
        alpha,
        conv_out,
        act_w,
        stride,
        padding,
        dilation,
        groups,
        needs,
    )


def _fake_layer_outputs(x, weight, scale, product, training, channel_shape):
    """A binary layer op's fake ``(y, std, alpha, product)`` from its fake pre-scale
    ``product``: alpha present without a learnable scale, the product kept with one,
    the per-sample std ``[N, 1, ...]`` in training (the core's contract)."""
    alpha = weight.new_empty((weight.shape[0],))
    y = product * (scale if scale is not None else alpha).reshape(channel_shape)
    std = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)) if training else _absent(x)
    if scale is not None:
        return y, std, _absent(weight), product
    return y, std, alpha, _absent(product)


def _layer_grads_fake(x, weight, has_bias, scale, needs):
    o = weight.shape[0]
    return (
        torch.empty_like(x) if needs[0] else _absent(x),
        torch.empty_like(weight) if needs[1] else _absent(weight),
        weight.new_empty((o,)) if needs[2] and has_bias else _absent(weight),
        scale.new_empty((o,)) if needs[3] and scale is not None else _absent(weight),
    )


@binary_conv2d_backward.register_fake
def _binary_conv2d_backward_fake(
    grad_y, x, weight, has_bias, scale, std, alpha, conv_out, act_w, *geometry_and_needs
):
    return _layer_grads_fake(x, weight, has_bias, scale, geometry_and_needs[-1])


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, scale, act_w, stride, padding, dilation, groups, _training, _dtype = inputs
    _, std, alpha, conv_out = output
    ctx.save_for_backward(x, weight, scale, std, alpha, conv_out)
    ctx.has_bias = bias is not None
    ctx.options = (act_w, stride, padding, dilation, groups)


def _conv_backward(ctx, grad_y, _grad_std, _grad_alpha, _grad_conv_out):
    x, weight, scale, std, alpha, conv_out = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = torch.ops.ovsw.binary_conv2d_backward(
        grad_y, x, weight, ctx.has_bias, scale, std, alpha, conv_out, *ctx.options, needs
    )
    return (*(_present(g, n) for g, n in zip(grads, needs)), *[None] * 7)


binary_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# -- the binary linear layer -----------------------------------------------------------------
@torch.library.custom_op("ovsw::binary_linear", mutates_args=_NO_MUTATION)
def binary_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    scale: Optional[Tensor],  # noqa: UP045
    act_w: str,
    training: bool,
    autocast_dtype: Optional[torch.dtype],  # noqa: UP045
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The binary linear layer: ``(y, std, alpha, product)``."""
    with _autocast(x, autocast_dtype):
        return _core.binary_linear_forward(x, weight, bias, scale, act_w, training)


@binary_linear.register_fake
def _binary_linear_fake(x, weight, bias, scale, act_w, training, autocast_dtype):
    _check_devices(x, weight=weight, bias=bias, scaling_factor=scale)
    product = F.linear(*_autocast_operands(autocast_dtype, x, weight, bias))
    return _fake_layer_outputs(x, weight, scale, product, training, (-1,))


@torch.library.custom_op("ovsw::binary_linear_backward", mutates_args=_NO_MUTATION)
def binary_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    scale: Optional[Tensor],  # noqa: UP045
    std: Tensor,
    alpha: Tensor,
    product: Tensor,
    act_w: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(x, weight, bias, scale)``; absent where ``needs`` is false."""
    return _core.binary_linear_backward(
        grad_y, x, weight, has_bias, scale, std, alpha, product, act_w, needs
    )


@binary_linear_backward.register_fake
def _binary_linear_backward_fake(
    grad_y, x, weight, has_bias, scale, std, alpha, product, act_w, needs
):
    return _layer_grads_fake(x, weight, has_bias, scale, needs)


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, scale, act_w, _training, _dtype = inputs
    _, std, alpha, product = output
    ctx.save_for_backward(x, weight, scale, std, alpha, product)
    ctx.has_bias = bias is not None
    ctx.act_w = act_w


def _linear_backward(ctx, grad_y, _grad_std, _grad_alpha, _grad_product):
    x, weight, scale, std, alpha, product = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    grads = torch.ops.ovsw.binary_linear_backward(
        grad_y, x, weight, ctx.has_bias, scale, std, alpha, product, ctx.act_w, needs
    )
    return (*(_present(g, n) for g, n in zip(grads, needs)), None, None, None)


binary_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# -- AGS + SAD ----------------------------------------------------------------------------------
class OvSWConfig(_core.OvSWConfig, _OpaqueBase):
    """The AGS and SAD settings (``_core.OvSWConfig``: built and validated once by the
    core, equal and hashed by value) as a constant opaque object (``typ="value"`` before
    torch 2.14), the one argument of ``ags_sad_step`` that carries them.
    :class:`ovsw.OvSW` builds one."""

    __slots__ = ()

    def __fx_repr__(self) -> tuple[str, dict[str, type]]:
        # The core's repr, OvSWConfig(enable_ags=..., ...), rebuilds it exactly.
        return repr(self), {"OvSWConfig": type(self)}


_register_opaque(OvSWConfig, typ=_CONSTANT)


@torch.library.custom_op("ovsw::ags_sad_step", mutates_args=("grads", "trackers", "weight_prevs"))
def ags_sad_step(
    grads: list[Tensor],
    weights: list[Tensor],
    trackers: list[Tensor],
    weight_prevs: list[Tensor],
    config: OvSWConfig,
) -> Tensor:
    """AGS then SAD in place; the per-layer figures ``[L, 2]`` (float64)."""
    none = [None] * len(weights)
    return _core.ags_sad_step(
        config, grads, weights, list(trackers) or none, list(weight_prevs) or none
    )


@ags_sad_step.register_fake
def _ags_sad_step_fake(grads, weights, trackers, weight_prevs, config):
    if weights:
        return weights[0].new_empty((len(weights), 2), dtype=torch.float64)
    return torch.empty((0, 2), dtype=torch.float64)
