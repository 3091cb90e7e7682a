"""The 1-bit layers of OvSW: ``OvSWConv2d`` (SPEC section 1) and ``OvSWLinear``.

The modules are shells: they hold parameters and buffers like ``torch.nn.Conv2d`` and
``torch.nn.Linear`` and call the ``torch.ops.ovsw`` custom ops (:mod:`ovsw.ops`), whose
forward and backward run in the Rust core, ``ovsw._core``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _core
from . import ops as _ops  # registers torch.ops.ovsw

__all__ = ["OvSWConv2d", "OvSWLinear", "BinaryLayer", "binary_layers", "binary_convs"]

_SAD_BUFFERS = ("weight_prev", "tracker")


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


def _check_fan_in(layer: nn.Module, name: str) -> None:
    """Refuse a layer of one weight per output channel without ``scaling_factor``: the
    scale derived from W (SPEC 1.4) divides by the unbiased deviation of the channel's
    weights, which one value does not have (upstream gives NaN)."""
    fan_in = layer.weight.shape[1:].numel()
    if fan_in < 2:
        raise ValueError(
            f"{name}: {fan_in} weight(s) per output channel; the "
            "scale derived from W needs at least two (it is NaN otherwise): pass "
            "scaling_factor=True, or keep the layer full precision"
        )


class BinaryLayer(nn.Module):
    """What every 1-bit layer of ovsw shares (:class:`OvSWConv2d`, :class:`OvSWLinear`):
    the binarizer options, the learnable scale and the SAD state.

    A subclass also derives from the ``torch.nn`` layer it binarizes, whose ``weight``
    ``[O, ...]`` (dim 0 the output channel or feature) it reuses.
    """

    weight: nn.Parameter
    scaling_factor: nn.Parameter | None
    tracker: Tensor | None
    weight_prev: Tensor | None

    def _init_binary(
        self, spec: _core.ConvSpec, scaling_factor: bool
    ) -> None:  # after the torch.nn layer's __init__
        self.spec = spec
        # The one option the math reads, as a plain str: torch.compile traces it as a
        # constant (spec is immutable).
        self._act_w = spec.act_w
        self.register_parameter("scaling_factor", None)
        for name in _SAD_BUFFERS:
            self.register_buffer(name, None)
        self._track_ones = False
        if not isinstance(scaling_factor, bool):
            raise TypeError(f"scaling_factor must be a bool, got {type(scaling_factor).__name__}")
        # On the meta device the weight comes later (ovsw.binarize checks it itself).
        if not scaling_factor and not self.weight.is_meta:
            _check_fan_in(self, type(self).__name__)
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

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_act_w" not in self.__dict__ and "spec" in self.__dict__:  # pickled before it
            self._act_w = self.spec.act_w


class OvSWConv2d(BinaryLayer, nn.Conv2d):
    """A binary (1-bit weight, 1-bit activation) ``nn.Conv2d``.

    Same constructor as :class:`torch.nn.Conv2d` (``bias`` defaults to ``False``), plus:

    Args:
        act_a: activation binarizer: {act_a} (sign, Bi-Real backward).
        act_w: weight binarizer: {act_w} (SPEC 1.3).
        scaling_factor: own a learnable per-channel scale (Parameter ``scaling_factor``,
            initialised to ``mean_o |W|``) instead of the scale derived from W. Required
            where an output channel has one weight (``in_channels / groups * kh * kw ==
            1``), whose derived scale is undefined: a ``ValueError`` says so.
        forward_type: {forward_type} (the one type upstream has).

    In training mode each sample is normalised by its standard deviation before
    binarization. SAD buffers (``weight_prev`` and ``tracker``) appear once
    :meth:`setup_sad` runs (the :class:`ovsw.OvSW` optimizer calls it) or when a
    state_dict carrying them is loaded. The forward is the ``torch.ops.ovsw.binary_conv2d``
    custom op (:mod:`ovsw.ops`).
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
        nn.Conv2d.__init__(
            self,
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
        self._init_binary(spec, scaling_factor)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Conv2d's name)
        if not isinstance(input, Tensor):
            raise TypeError(f"OvSWConv2d expects a torch.Tensor, got {type(input).__name__}")
        return torch.ops.ovsw.binary_conv2d(
            input,
            self.weight,
            self.bias,
            self.scaling_factor,
            self._act_w,
            list(self.stride),
            list(_explicit_padding(self)),
            list(self.dilation),
            self.groups,
            self.training,
            _ops.autocast_dtype(input),
        )[0]


class OvSWLinear(BinaryLayer, nn.Linear):
    """A binary (1-bit weight, 1-bit activation) ``nn.Linear``.

    Same constructor as :class:`torch.nn.Linear`, except that ``bias`` defaults to
    ``False`` (as for :class:`OvSWConv2d`), plus the same options as OvSWConv2d:

    Args:
        act_a: activation binarizer: {act_a} (sign, Bi-Real backward).
        act_w: weight binarizer: {act_w} (SPEC 1.3, per output feature).
        scaling_factor: own a learnable per-feature scale (Parameter ``scaling_factor``,
            initialised to ``mean_o |W|``) instead of the scale derived from W. Required
            with ``in_features == 1`` (a ``ValueError`` says so); such a layer also needs
            more than one value per sample in training mode (``[N, L, 1]``, not
            ``[N, 1]``), or the per-sample deviation is NaN.
        forward_type: {forward_type}.

    ``y = (sign(x_hat) sign(W)^T + bias) * alpha``: the input ``[N, *, in_features]`` is
    normalised per sample over all its non-batch dims in training mode, as the conv's
    is; alpha (SPEC 1.4) has one value per output feature. AGS and SAD act on it as on
    the convs (``tracker`` and ``weight_prev`` buffers, the same ``state_dict``
    semantics), and the deploy engine runs it as an XNOR-popcount product. The forward
    is the ``torch.ops.ovsw.binary_linear`` custom op.
    """

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
        spec = _core.ConvSpec(act_a=act_a, act_w=act_w, forward_type=forward_type)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_binary(spec, scaling_factor)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Linear's name)
        if not isinstance(input, Tensor):
            raise TypeError(f"OvSWLinear expects a torch.Tensor, got {type(input).__name__}")
        return torch.ops.ovsw.binary_linear(
            input,
            self.weight,
            self.bias,
            self.scaling_factor,
            self._act_w,
            self.training,
            _ops.autocast_dtype(input),
        )[0]


def _choices(names: list[str]) -> str:
    quoted = [f"``{n!r}``" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


# The option names as the Rust core defines them (ConvSpec validates against the same).
for _cls in (OvSWConv2d, OvSWLinear):
    _cls.__doc__ = (_cls.__doc__ or "").format(
        act_a=_choices(_core.act_a_names()),
        act_w=_choices(_core.act_w_names()),
        forward_type=_choices(_core.forward_type_names()),
    )


def binary_layers(model: nn.Module) -> list[tuple[str, BinaryLayer]]:
    """``(name, module)`` of every binary layer (:class:`OvSWConv2d` and
    :class:`OvSWLinear`) in ``model``, in model order: the layers :class:`ovsw.OvSW`
    acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryLayer)]


def binary_convs(model: nn.Module) -> list[tuple[str, OvSWConv2d]]:
    """``(name, module)`` of every :class:`OvSWConv2d` in ``model``, in model order (the
    binary convs only; :func:`binary_layers` adds the linear layers)."""
    return [(n, m) for n, m in binary_layers(model) if isinstance(m, OvSWConv2d)]
