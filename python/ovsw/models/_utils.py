"""Helpers shared by the architecture files (private to :mod:`ovsw.models`)."""

from __future__ import annotations

from torch import nn

from ..nn import OvSWConv2d, binary_convs

__all__ = ["binary_conv", "check_num_classes", "apply_scaling_factor"]


def check_num_classes(num_classes) -> int:
    """``num_classes`` as an int, or ``ValueError`` unless it is a positive integer."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def binary_conv(
    in_planes: int,
    out_planes: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    act_a: str,
    act_w: str,
    forward_type: str,
) -> OvSWConv2d:
    """A bias-free :class:`OvSWConv2d` with weight ``kaiming_normal_(mode="fan_in",
    nonlinearity="leaky_relu")`` (SPEC section 4, the default binary-conv init).

    The scaling factor is never created here: :func:`apply_scaling_factor` adds it once
    the whole model is initialised.
    """
    conv = OvSWConv2d(
        in_planes,
        out_planes,
        kernel_size,
        stride=stride,
        padding=padding,
        bias=False,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=False,
        forward_type=forward_type,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="leaky_relu")
    return conv


def apply_scaling_factor(model: nn.Module, scaling_factor: bool) -> None:
    """With ``scaling_factor``, give every binary conv its learnable per-channel scale,
    initialised from the weight as it is now (call it last, after the model's init)."""
    if scaling_factor:
        for _, conv in binary_convs(model):
            conv.init_scaling_factor()
