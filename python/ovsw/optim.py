"""OvSW: an optimizer wrapper that applies AGS and SAD before the wrapped update.

SPEC sections 2 and 3. The math runs in the ``torch.ops.ovsw.ags_sad_step`` custom op
(``ovsw._core`` underneath), so ``torch.compile`` can trace a step; this class holds the
settings, finds the binary layers, and behaves as a ``torch.optim.Optimizer``
(param_groups, state, zero_grad, state_dict, LR schedulers, ``torch.amp.GradScaler``).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from . import _core
from . import ops as _ops  # registers torch.ops.ovsw
from .nn import binary_layers

__all__ = ["OvSW"]


#: The OvSW options as the Rust core defines them (``_core.ovsw_options()``): name, type,
#: default, valid range (and its text) and help, in constructor order.
OPTIONS: tuple[dict[str, Any], ...] = tuple(_core.ovsw_options())


def _options_doc() -> str:
    lines = []
    for o in OPTIONS:
        valid = f", {o['range']}" if o["range"] else ""
        head = f"{o['name']} ({o['type']}, default {o['default']!r}{valid})"
        lines.append(f"            {head}: {o['help']}.")
    return "\n".join(lines)


class OvSW(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every ``step()`` first applies Adaptive Gradient Scaling
        and Silence Awareness Decaying to the weight gradients of the model's binary
        layers (:class:`~ovsw.OvSWConv2d` and :class:`~ovsw.OvSWLinear`, as
        :func:`ovsw.binary_layers` lists them), then steps ``optimizer``.

        The transformed gradients stay in ``.grad`` (as upstream leaves them). SAD state
        lives in each layer's ``tracker`` and ``weight_prev`` buffers, so
        ``model.state_dict()`` carries it; with ``enable_dampen`` the buffers are created
        here unless the layers already hold them (for instance from a loaded checkpoint).

        Args:
            optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
            model: the network (a ``DistributedDataParallel`` wrapper works too).
            **options: the OvSW options, by keyword (``ovsw.optim.OPTIONS``, defined by the
                Rust core; a value outside its range raises ValueError, an unknown name
                TypeError):
    {options}
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        **options: Any,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"OvSW wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, OvSW):
            raise TypeError("OvSW cannot wrap another OvSW")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        # Built and validated once, by the core; each step hands it to the op as it is.
        self.config = _ops.OvSWConfig(**options)
        self.layers = binary_layers(model)
        if not self.layers:
            raise ValueError(
                f"the model ({type(model).__name__}) has no binary layer (OvSWConv2d or "
                "OvSWLinear) for OvSW to act on; ovsw.binarize(model) converts one"
            )
        self._dampen = self.config.enable_dampen
        self.optimizer = optimizer
        # The hook tables torch.optim.Optimizer.__init__ would create; parameters, groups
        # and state stay the wrapped optimizer's (see the properties below).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        # The last step's figures: "figures" on the device with their layer "names", and
        # "stats" as dicts once read. A dict updated in place, not attributes set on self:
        # torch.compile traces a step that updates it (not one that sets attributes on
        # an optimizer).
        self._last: dict[str, Any] = {"figures": None, "names": [], "stats": None}
        if self.config.enable_dampen:
            for _, layer in self.layers:
                layer.setup_sad(self.config.track_ones)

    # -- the wrapped optimizer's state --------------------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict (SAD state is in the model's buffers)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"OvSW({self.config!r}, optimizer={self.optimizer!r})"

    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- the OvSW step --------------------------------------------------------------
    @torch.no_grad()
    def _apply(self) -> None:
        """AGS then SAD on the binary layers' gradients, in place. The per-layer figures
        stay on the weights' device (a float64 ``[L, 2]`` tensor) until someone asks."""
        active = [(n, m) for n, m in self.layers if m.weight.grad is not None]
        sad = self._dampen
        if sad:
            for n, m in active:
                if not m.has_sad_state:
                    raise ValueError(
                        f"layer {n!r} has no SAD buffers (tracker, weight_prev) but SAD is "
                        "enabled; call its setup_sad() (OvSW does for the layers it finds)"
                    )
        self._last["figures"] = torch.ops.ovsw.ags_sad_step(
            [m.weight.grad for _, m in active],
            [m.weight for _, m in active],
            [m.tracker for _, m in active] if sad else [],
            [m.weight_prev for _, m in active] if sad else [],
            self.config,
        )
        self._last["names"] = [n for n, _ in active]
        self._last["stats"] = None

    def apply_ags_sad(self) -> list[dict[str, Any]]:
        """Apply AGS then SAD to the binary layers' gradients in place (``step()`` does
        this before the wrapped update) and return the per-layer figures, as
        :meth:`stats` does."""
        self._apply()
        return self.stats()

    def step(self, closure: Callable[[], Any] | None = None):  # type: ignore[override]
        """Evaluate ``closure`` (if given), apply AGS and SAD, then step the wrapped
        optimizer. A step that ``GradScaler`` skips never reaches here, so it leaves the
        SAD state untouched. Nothing is copied to the host: the figures wait on the
        device for :meth:`stats`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._apply()
        self.optimizer.step()
        return loss

    def _converted(self) -> list[dict[str, Any]]:
        """The last step's figures as dicts, read from the device once per step."""
        last = self._last
        if last["stats"] is None:
            if last["figures"] is None:
                last["stats"] = []
            else:
                cfg = self.config
                rows = last["figures"].tolist()  # the one device-to-host copy
                by_name = {
                    name: (
                        row[0] if cfg.enable_ags else None,
                        row[1] if cfg.enable_dampen else None,
                    )
                    for name, row in zip(last["names"], rows)
                }
                last["stats"] = [
                    {
                        "name": n,
                        "ags_ratio": by_name.get(n, (None, None))[0],
                        "silent_ratio": by_name.get(n, (None, None))[1],
                    }
                    for n, _ in self.layers
                ]
        return last["stats"]

    def stats(self) -> list[dict[str, Any]]:
        """One entry per binary layer, in model order, from the last step:
        ``{"name", "ags_ratio", "silent_ratio"}`` (``None`` where disabled)."""
        return [dict(s) for s in self._converted()]

    def mean_silent_ratio(self) -> float | None:
        """Mean silent fraction over the binary layers at the last step."""
        vals = [s["silent_ratio"] for s in self._converted() if s["silent_ratio"] is not None]
        return sum(vals) / len(vals) if vals else None


def _signature() -> inspect.Signature:
    """``OvSW.__init__``'s signature with the options spelled out from the table."""
    p = inspect.Parameter
    params = [
        p("self", p.POSITIONAL_OR_KEYWORD),
        p("optimizer", p.POSITIONAL_OR_KEYWORD, annotation=torch.optim.Optimizer),
        p("model", p.POSITIONAL_OR_KEYWORD, annotation=nn.Module),
    ]
    types = {"bool": bool, "float": float}
    params += [
        p(o["name"], p.KEYWORD_ONLY, default=o["default"], annotation=types[o["type"]])
        for o in OPTIONS
    ]
    return inspect.Signature(params, return_annotation=None)


OvSW.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
OvSW.__doc__ = (OvSW.__doc__ or "").format(options=_options_doc())
