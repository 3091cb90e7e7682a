"""The flip monitor: how many binary weights flip sign, and how many never do."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _core
from ..nn import BinaryLayer, binary_layers
from ..optim import OvSW

__all__ = ["FIGURES", "FlipMonitor", "TRACKER_EDGES"]

#: The per-layer figures, in the column order of :meth:`FlipMonitor.figures`.
FIGURES = ("flipped", "never_flipped", "silent", "flip_rate")

#: Default histogram edges for tracker values (which lie in [0, 1]): zero, then decades.
TRACKER_EDGES = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

_DEFAULT_MOMENTUM = next(
    o["default"] for o in _core.ovsw_options() if o["name"] == "track_momentum"
)
_DEFAULT_THRESHOLD = next(
    o["default"] for o in _core.ovsw_options() if o["name"] == "track_threshold"
)
_STATE_VERSION = 1


def _plain_name(name: str) -> str:
    """A layer's name without the ``module.`` of a DataParallel/DDP wrapper."""
    return name.removeprefix("module.")


class FlipMonitor:
    """Counts sign flips of the latent weights of every binary layer
    (:class:`~ovsw.OvSWConv2d`, :class:`~ovsw.OvSWLinear`) in ``model``, after each
    optimizer step, with any optimizer.

    Call :meth:`update` after every optimizer step. Per binary layer it then holds:

    - ``flipped``: the share of weights whose sign changed at this step;
    - ``never_flipped``: the share whose sign has not changed once since monitoring
      began (the paper's silent-weight count; exact, kept as one bit per weight);
    - ``silent``: the share whose sign-flip tracker is below the threshold, the weights
      SAD decays;
    - ``flip_rate``: the exponential moving average (momentum ``track_momentum``) of
      the per-step flipped share, bias-corrected (``ema / (1 - m^steps)``).

    A flip is ``sign(W) != sign(W_before)`` with :func:`torch.sign` (0 counts as a sign
    of its own), as SAD defines it (SPEC section 3).

    **The tracker.** When ``optimizer`` is an :class:`~ovsw.OvSW` with SAD enabled, the
    monitor reads each layer's SAD ``tracker`` buffer (it never writes it), so
    ``silent`` is exactly the share SAD decays at the next step, and SAD's
    ``track_momentum`` and ``track_threshold`` apply. Otherwise (any other optimizer, or
    OvSW without SAD) the monitor keeps a tracker of its own per weight with SAD's
    update ``T <- m * T + (1 - m) * flipped`` (zeros at the start), fed by the flips it
    sees after each step, so vanilla and OvSW runs report comparable figures. SAD's
    tracker sees a step's flips one step later (it compares before the update); the
    monitor's own sees them right after.

    The figures stay on the weights' device: :meth:`update` makes no host copy, and
    :meth:`stats` / :meth:`total` read them once when asked. The counting runs in the
    Rust core (``ovsw._core.flip_monitor_step``): fused loops on contiguous float32 CPU
    weights, libtorch ops on other devices and dtypes.

    :meth:`state_dict` / :meth:`load_state_dict` carry the state (signs, ever-flipped
    masks, own trackers, flip-rate averages and the step count), so a resumed run
    continues the never-flipped count exactly. Create the monitor after the model is on
    its device; a step the AMP ``GradScaler`` skips leaves the weights alone and counts
    as a step without flips.

    Args:
        model: the network (a ``DistributedDataParallel`` wrapper works too; layer names
            drop its ``module.`` prefix).
        optimizer: optional; an :class:`~ovsw.OvSW` with SAD enabled lends its trackers.
        track_momentum: ``m`` of the monitor's own tracker and of the flip-rate average
            (default: SAD's, 0.999). With SAD's tracker it must equal SAD's, if given.
        track_threshold: ``tau`` below which a weight is silent (default: SAD's, 1e-4).
            With SAD's tracker it must equal SAD's, if given.

    >>> monitor = ovsw.analysis.FlipMonitor(model)
    >>> for x, y in loader:
    ...     opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    ...     monitor.update()
    >>> monitor.total()["never_flipped"]
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        track_momentum: float | None = None,
        track_threshold: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.layers: list[tuple[str, BinaryLayer]] = [
            (_plain_name(n), m) for n, m in binary_layers(model)
        ]
        if not self.layers:
            raise ValueError(
                f"the model ({type(model).__name__}) has no binary layer "
                "(OvSWConv2d, OvSWLinear) to monitor"
            )
        sad = optimizer.config if isinstance(optimizer, OvSW) else None
        self.uses_sad_tracker = bool(sad is not None and sad.enable_dampen)
        if self.uses_sad_tracker:
            for what, given, own in (
                ("track_momentum", track_momentum, sad.track_momentum),
                ("track_threshold", track_threshold, sad.track_threshold),
            ):
                if given is not None and float(given) != own:
                    raise ValueError(
                        f"{what}={given} differs from the SAD tracker's {own}; the monitor "
                        f"reads SAD's tracker, so leave {what} out"
                    )
            m, tau = sad.track_momentum, sad.track_threshold
        else:
            m = _DEFAULT_MOMENTUM if track_momentum is None else track_momentum
            tau = _DEFAULT_THRESHOLD if track_threshold is None else track_threshold
        # Checked once, by the core (against SAD's option ranges), and handed to every
        # update as it is.
        self._config = _core.FlipMonitorConfig(float(m), float(tau), not self.uses_sad_tracker)
        self.numels = [m.weight.numel() for _, m in self.layers]
        self.reset()

    @property
    def track_momentum(self) -> float:
        """``m``: the tracker's momentum and the flip-rate average's."""
        return self._config.track_momentum

    @property
    def track_threshold(self) -> float:
        """``tau``: a weight whose tracker is below it is silent."""
        return self._config.track_threshold

    # -- state -----------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        """Start monitoring afresh from the current weights: nothing has flipped, own
        trackers at zero, no steps."""
        self._sign: list[torch.Tensor] = []
        self._ever: list[torch.Tensor] = []
        self._own_tracker: list[torch.Tensor] = []
        for _, m in self.layers:
            sign, ever, tracker = _core.flip_monitor_state(
                m.weight.detach(), not self.uses_sad_tracker
            )
            self._sign.append(sign)
            self._ever.append(ever)
            if tracker is not None:
                self._own_tracker.append(tracker)
        device = self.layers[0][1].weight.device
        self._rates = torch.zeros(len(self.layers), dtype=torch.float64, device=device)
        self.steps = 0
        self._figures: torch.Tensor | None = None

    def _trackers(self) -> list[torch.Tensor]:
        if not self.uses_sad_tracker:
            return self._own_tracker
        missing = [n for n, m in self.layers if m.tracker is None]
        if missing:
            raise RuntimeError(
                f"layer {missing[0]} has no SAD tracker; build the OvSW optimizer (which "
                "sets SAD up) before the monitor, on the same model"
            )
        return [m.tracker for _, m in self.layers]

    @torch.no_grad()
    def update(self) -> None:
        """Count the flips since the last call (or since monitoring began). Call it
        after every optimizer step. Makes no host copy."""
        self._figures = _core.flip_monitor_step(
            [m.weight.detach() for _, m in self.layers],
            self._sign,
            self._ever,
            self._trackers(),
            self._rates,
            self.steps + 1,
            self._config,
        )
        self.steps += 1

    # -- figures ---------------------------------------------------------------------
    def figures(self) -> torch.Tensor | None:
        """The last update's figures: a float64 ``[L, 4]`` tensor on the weights' device,
        columns as :data:`FIGURES`, layers in model order (``None`` before the first
        update). Reading it is the caller's device-to-host copy."""
        return self._figures

    def stats(self) -> list[dict[str, Any]]:
        """Per binary layer, in model order, after the last update: ``{"name",
        "weights", "flipped", "never_flipped", "silent", "flip_rate"}`` (shares in [0,
        1]); an empty list before the first update. One device-to-host copy."""
        if self._figures is None:
            return []
        rows = self._figures.tolist()
        return [
            {"name": name, "weights": n, **dict(zip(FIGURES, row))}
            for (name, _), n, row in zip(self.layers, self.numels, rows)
        ]

    def total(self, stats: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The figures over all binary weights (each layer weighted by its number of
        weights) of ``stats`` (default: :meth:`stats`); ``None`` before the first
        update."""
        stats = self.stats() if stats is None else stats
        if not stats:
            return None
        n = sum(s["weights"] for s in stats)
        out: dict[str, Any] = {"name": "total", "weights": n}
        for key in FIGURES:
            out[key] = sum(s[key] * s["weights"] for s in stats) / n
        return out

    @torch.no_grad()
    def trackers(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tracker)`` per layer: the tensors ``silent`` is counted from."""
        return [(name, t) for (name, _), t in zip(self.layers, self._trackers())]

    @torch.no_grad()
    def histogram(self, edges: tuple[float, ...] = TRACKER_EDGES) -> list[dict[str, Any]]:
        """A histogram of each layer's tracker values (call it once per epoch): per layer
        ``{"name", "edges", "counts", "min", "max", "sum", "sum_squares"}``, bin ``k``
        counting values in ``[edges[k], edges[k + 1])`` (the last bin closed; values
        outside the edges are left out). Computed on the device, one host copy."""
        e = [float(x) for x in edges]
        if len(e) < 2 or any(b <= a for a, b in zip(e, e[1:])):
            raise ValueError(f"edges must be at least two increasing numbers, got {edges}")
        rows = []
        for _, t in self.trackers():
            v = t.detach().reshape(-1)
            at_least = torch.stack([(v >= x).sum() for x in e[:-1]] + [(v > e[-1]).sum()])
            counts = at_least[:-1] - at_least[1:]
            vd = v.double()
            rows.append(
                torch.cat(
                    [
                        counts.double(),
                        torch.stack([vd.min(), vd.max(), vd.sum(), vd.square().sum()]),
                    ]
                )
            )
        host = torch.stack(rows).tolist()  # the one device-to-host copy
        nb = len(e) - 1
        return [
            {
                "name": name,
                "edges": e,
                "counts": [int(c) for c in row[:nb]],
                "min": row[nb],
                "max": row[nb + 1],
                "sum": row[nb + 2],
                "sum_squares": row[nb + 3],
            }
            for (name, _), row in zip(self.layers, host)
        ]

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state (tensors, numbers and names only: ``torch.load`` with
        ``weights_only=True`` reads it)."""
        return {
            "version": _STATE_VERSION,
            "names": [n for n, _ in self.layers],
            "steps": self.steps,
            "sad_tracker": self.uses_sad_tracker,
            "track_momentum": self.track_momentum,
            "track_threshold": self.track_threshold,
            "sign": [t.clone() for t in self._sign],
            "ever_flipped": [t.clone() for t in self._ever],
            "tracker": [t.clone() for t in self._own_tracker],
            "rates": self._rates.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state_dict` of a monitor over the same layers
        with the same tracker): a ValueError names what does not fit."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a FlipMonitor state_dict (or one of another version)")
        names = [n for n, _ in self.layers]
        if list(state["names"]) != names:
            theirs = list(state["names"])
            diff = next(
                (f"{a!r} vs {b!r}" for a, b in zip(theirs, names) if a != b),
                f"{len(theirs)} layers vs {len(names)}",
            )
            raise ValueError(f"the monitor state is of other layers ({diff})")
        if bool(state["sad_tracker"]) != self.uses_sad_tracker:
            saved = "SAD's tracker" if state["sad_tracker"] else "its own tracker"
            now = "SAD's" if self.uses_sad_tracker else "its own"
            raise ValueError(f"the monitor state was saved with {saved}; this monitor uses {now}")
        for key in ("track_momentum", "track_threshold"):
            if float(state[key]) != getattr(self, key):
                raise ValueError(
                    f"the monitor state has {key}={state[key]}, this monitor {getattr(self, key)}"
                )
        groups = [("sign", self._sign), ("ever_flipped", self._ever)]
        if not self.uses_sad_tracker:
            groups.append(("tracker", self._own_tracker))
        for key, own in groups:
            saved = state[key]
            if len(saved) != len(own):
                raise ValueError(
                    f"the monitor state holds {len(saved)} {key} tensors, not {len(own)}"
                )
            for name, mine, theirs in zip(names, own, saved):
                if tuple(theirs.shape) != tuple(mine.shape) or theirs.dtype != mine.dtype:
                    raise ValueError(
                        f"the monitor state's {key} of {name} is {theirs.dtype} "
                        f"{tuple(theirs.shape)}, the layer needs {mine.dtype} {tuple(mine.shape)}"
                    )
        rates = state["rates"]
        if tuple(rates.shape) != tuple(self._rates.shape):
            raise ValueError(
                f"the monitor state's rates have shape {tuple(rates.shape)}, "
                f"not {tuple(self._rates.shape)}"
            )
        for key, own in groups:
            for mine, theirs in zip(own, state[key]):
                mine.copy_(theirs)
        self._rates.copy_(rates)
        self.steps = int(state["steps"])
        self._figures = None

    def __repr__(self) -> str:
        tracker = "SAD's tracker" if self.uses_sad_tracker else "own tracker"
        return (
            f"FlipMonitor({len(self.layers)} layers, {sum(self.numels)} weights, {tracker}, "
            f"track_momentum={self.track_momentum}, track_threshold={self.track_threshold}, "
            f"steps={self.steps})"
        )
