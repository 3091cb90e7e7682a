"""OvSWConv2d: the 1-bit convolution of OvSW (SPEC section 1).

The module is a shell: it holds parameters and buffers like ``torch.nn.Conv2d`` and
hands the math (forward and backward) to the Rust core, ``ovsw._core``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _core

__all__ = ["OvSWConv2d", "binary_convs"]

_SAD_BUFFERS = ("weight_prev", "tracker")


class _BinaryConv2dFunction(torch.autograd.Function):
    """Autograd glue: forward and backward both run in ``_core``."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, spec, geometry, training):
        y, std, alpha, conv_out, conv_dtype = _core.binary_conv2d_forward(
            x, weight, bias, scale, spec, *geometry, training
        )
        ctx.save_for_backward(x, weight, scale, std, alpha, conv_out)
        ctx.spec = spec
        ctx.geometry = geometry
        ctx.conv_dtype = conv_dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scale, std, alpha, conv_out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gx, gw, gb, gs = _core.binary_conv2d_backward(
            grad_y,
            x,
            weight,
            ctx.has_bias,
            scale,
            std,
            alpha,
            conv_out,
            ctx.conv_dtype,
            ctx.spec,
            *ctx.geometry,
            (needs[0], needs[1], needs[2], needs[3]),
        )
        return gx, gw, gb, gs, None, None, None


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two integers (``'valid'`` and odd-window ``'same'`` included)."""
    padding = conv.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    "OvSWConv2d supports padding='same' only with symmetric padding "
                    f"(dilation * (kernel - 1) even); got kernel_size={conv.kernel_size}, "
                    f"dilation={conv.dilation}"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(padding[0]), int(padding[1]))


class OvSWConv2d(nn.Conv2d):
    """A binary (1-bit weight, 1-bit activation) ``nn.Conv2d``.

    Same constructor as :class:`torch.nn.Conv2d` (``bias`` defaults to ``False``), plus:

    Args:
        act_a: activation binarizer: {act_a} (sign, Bi-Real backward).
        act_w: weight binarizer: {act_w} (SPEC 1.3).
        scaling_factor: own a learnable per-channel scale (Parameter ``scaling_factor``,
            initialised to ``mean_o |W|``) instead of the scale derived from W.
        forward_type: {forward_type} (the one type upstream has).

    In training mode each sample is normalised by its standard deviation before
    binarization. SAD buffers (``weight_prev`` and ``tracker``) appear once
    :meth:`setup_sad` runs (the :class:`ovsw.OvSW` optimizer calls it) or when a
    state_dict carrying them is loaded.
    """

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
        spec = _core.ConvSpec(act_a=act_a, act_w=act_w, forward_type=forward_type)
        if padding_mode != "zeros":
            raise ValueError(
                f"OvSWConv2d pads the binarized activation with zeros; padding_mode="
                f"{padding_mode!r} is not supported"
            )
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
        _explicit_padding(self)  # reject unsupported 'same' windows now, not at forward
        self.spec = spec
        self.register_parameter("scaling_factor", None)
        for name in _SAD_BUFFERS:
            self.register_buffer(name, None)
        self._track_ones = False
        if scaling_factor:
            self.init_scaling_factor()

    # -- options -------------------------------------------------------------------
    @property
    def act_a(self) -> str:
        return self.spec.act_a

    @property
    def act_w(self) -> str:
        return self.spec.act_w

    @property
    def forward_type(self) -> str:
        return self.spec.forward_type

    def init_scaling_factor(self) -> None:
        """Give the layer a learnable ``scaling_factor`` equal to ``mean_o |W|`` of the
        current weight (call it after the weight is initialised)."""
        with torch.no_grad():
            value = _core.channel_abs_mean(self.weight.detach())
        self.scaling_factor = nn.Parameter(value.clone())

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", act_a={self.act_a!r}, act_w={self.act_w!r}"
        if self.scaling_factor is not None:
            s += ", scaling_factor=True"
        return s

    # -- SAD state -------------------------------------------------------------------
    @property
    def has_sad_state(self) -> bool:
        return self.tracker is not None and self.weight_prev is not None

    def setup_sad(self, track_ones: bool = False) -> None:
        """Create the SAD buffers if the layer has none (or they no longer fit W).

        Buffers already present, for instance loaded from a checkpoint, are kept.
        """
        self._track_ones = bool(track_ones)
        if self.has_sad_state and self.tracker.shape == self.weight.shape:
            return
        self.reset_sad()

    def reset_sad(self) -> None:
        """Start SAD afresh: tracker zeros (ones with ``track_ones``), ``weight_prev = W``."""
        tracker, prev = _core.sad_initial_state(self.weight.detach(), self._track_ones)
        self.tracker = tracker
        self.weight_prev = prev

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # SAD buffers are optional on both sides: a checkpoint's tracker/weight_prev are
        # taken whether or not SAD is set up here, and a checkpoint without them loads
        # into a layer with SAD set up (which then restarts from the loaded weight).
        incoming = [n for n in _SAD_BUFFERS if prefix + n in state_dict]
        for name in incoming:
            if getattr(self, name) is None:
                value = state_dict[prefix + name]
                setattr(
                    self,
                    name,
                    torch.empty_like(value, device=self.weight.device, dtype=self.weight.dtype),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        absent = [prefix + n for n in _SAD_BUFFERS if prefix + n not in state_dict]
        if absent and self.has_sad_state:
            missing_keys[:] = [k for k in missing_keys if k not in absent]
            if prefix + "weight" in state_dict:
                self.reset_sad()

    # -- forward ---------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Conv2d's name)
        if not isinstance(input, Tensor):
            raise TypeError(f"OvSWConv2d expects a torch.Tensor, got {type(input).__name__}")
        geometry = (
            tuple(self.stride),
            _explicit_padding(self),
            tuple(self.dilation),
            self.groups,
        )
        return _BinaryConv2dFunction.apply(
            input,
            self.weight,
            self.bias,
            self.scaling_factor,
            self.spec,
            geometry,
            self.training,
        )


def _choices(names: list[str]) -> str:
    quoted = [f"``{n!r}``" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# The option names as the Rust core defines them (ConvSpec validates against the same).
OvSWConv2d.__doc__ = (OvSWConv2d.__doc__ or "").format(
    act_a=_choices(_core.act_a_names()),
    act_w=_choices(_core.act_w_names()),
    forward_type=_choices(_core.forward_type_names()),
)


def binary_convs(model: nn.Module) -> list[tuple[str, OvSWConv2d]]:
    """``(name, module)`` of every :class:`OvSWConv2d` in ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OvSWConv2d)]
