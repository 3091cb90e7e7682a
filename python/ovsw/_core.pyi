"""Type stubs for ovsw._core, the Rust core (src/lib.rs; checked against the compiled
module by tests/test_stubs.py)."""

from typing import Literal, TypedDict, final

import numpy as np
from torch import Tensor
from typing_extensions import Self

__version__: str

__all__ = [
    "ConvSpec",
    "act_w_names",
    "act_a_names",
    "forward_type_names",
    "binary_conv2d_forward",
    "binary_conv2d_backward",
    "binarize_weight",
    "channel_abs_mean",
    "channel_alpha",
    "OvSWConfig",
    "ovsw_options",
    "sad_initial_state",
    "ags_sad_step",
    "flip_monitor_state",
    "flip_monitor_step",
    "DeployEngine",
    "deploy_kernels",
    "__version__",
]

_Pair = tuple[int, int]

@final
class ConvSpec:
    """Options of a binary convolution, validated once (unknown names raise ValueError)."""

    def __new__(
        cls, act_a: str = "binary", act_w: str = "ste", forward_type: str = "xnor"
    ) -> Self: ...
    @property
    def act_a(self) -> str: ...
    @property
    def act_w(self) -> str: ...
    @property
    def forward_type(self) -> str: ...

@final
class OvSWConfig:
    """AGS and SAD settings, validated against the option table (``ovsw_options()``):
    an unknown name or a wrong type raises TypeError, a value outside its range
    ValueError. Options go by keyword, or by position in table order."""

    def __new__(
        cls,
        *args: bool | float,
        enable_ags: bool = False,
        delta: float = 0.01,
        enable_dampen: bool = False,
        dampen_weight: float = 0.0,
        track_momentum: float = 0.999,
        track_threshold: float = 1e-4,
        track_ones: bool = False,
    ) -> Self: ...
    @property
    def enable_ags(self) -> bool: ...
    @property
    def delta(self) -> float: ...
    @property
    def enable_dampen(self) -> bool: ...
    @property
    def dampen_weight(self) -> float: ...
    @property
    def track_momentum(self) -> float: ...
    @property
    def track_threshold(self) -> float: ...
    @property
    def track_ones(self) -> bool: ...

class _OvSWOption(TypedDict):
    """One entry of ``ovsw_options()``."""

    name: str
    type: Literal["bool", "float"]
    default: bool | float
    min: float | None
    min_inclusive: bool
    max: float | None
    max_inclusive: bool
    help: str

def ovsw_options() -> list[_OvSWOption]:
    """The OvSW options in constructor order: name, type, default, valid range (floats
    must also be finite) and a line of help. The one definition they all derive from."""

def act_w_names() -> list[str]:
    """The weight binarizers (``act_w``)."""

def act_a_names() -> list[str]:
    """The activation binarizers (``act_a``)."""

def forward_type_names() -> list[str]:
    """The forward types (``forward_type``)."""

def binary_conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    spec: ConvSpec,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    groups: int,
    training: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, int]:
    """Returns (y, std, alpha, conv_out, conv_dtype) for the autograd glue to save."""

def binary_conv2d_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    scale: Tensor | None,
    std: Tensor | None,
    alpha: Tensor | None,
    conv_out: Tensor | None,
    conv_dtype: int,
    spec: ConvSpec,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    groups: int,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of (x, weight, bias, scale); None where not needed."""

def binarize_weight(weight: Tensor, spec: ConvSpec) -> Tensor:
    """w_b, the binarized weight (SPEC 1.3)."""

def channel_abs_mean(weight: Tensor) -> Tensor:
    """mean_o |W| per output channel, shape [O]."""

def channel_alpha(weight: Tensor) -> Tensor:
    """The W-derived per-channel scale alpha of SPEC 1.4, shape [O]."""

def sad_initial_state(weight: Tensor, track_ones: bool) -> tuple[Tensor, Tensor]:
    """Fresh (tracker, weight_prev) for a weight."""

def ags_sad_step(
    config: OvSWConfig,
    grads: list[Tensor],
    weights: list[Tensor],
    trackers: list[Tensor | None],
    weight_prevs: list[Tensor | None],
) -> Tensor:
    """AGS then SAD in place. Returns the per-layer figures as one float64 tensor of shape
    [L, 2] on the weights' device (column 0 ags_ratio, column 1 silent_ratio; NaN where
    that part is disabled), with no device-to-host copy."""

# -- flip monitor (src/optim/monitor/, wrapped by ovsw.analysis.FlipMonitor) --------------

def flip_monitor_state(weight: Tensor, own_tracker: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fresh monitor state for a weight: (sign int8, ever_flipped bool all False, tracker
    zeros in W's dtype or None without own_tracker)."""

def flip_monitor_step(
    weights: list[Tensor],
    signs: list[Tensor],
    ever_flipped: list[Tensor],
    trackers: list[Tensor],
    rates: Tensor,
    step: int,
    track_momentum: float,
    track_threshold: float,
    update_trackers: bool,
) -> Tensor:
    """One monitoring step after an optimizer update, in place on signs, ever_flipped,
    rates (float64 [L]) and, with update_trackers, the trackers. Returns float64 [L, 4]
    on the weights' device (flipped, never flipped, silent, bias-corrected flip rate),
    with no device-to-host copy."""

# -- deploy engine (src/deploy/, wrapped by ovsw.deploy) ----------------------------------

@final
class DeployEngine:
    """A network from an ovsw.deploy file; runs without PyTorch on its own thread pool.

    Raises ValueError for a corrupt, truncated or unsupported file, an unknown kernel or
    threads < 1.
    """

    def __new__(cls, data: bytes, threads: int, kernel: str = "auto") -> Self: ...
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW in; (N, K) out when the result is 1x1, else NCHW."""
    def profile(self, x: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str, list[int], float]]]:
        """Output and (name, op, output NCHW shape, seconds) per op."""
    def run_op(self, name: str, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The single op `name` on `x` (and `residual`)."""
    threads: int
    @property
    def kernel(self) -> str: ...
    @property
    def input_channels(self) -> int: ...
    @property
    def ops(self) -> list[tuple[str, str]]: ...
    @property
    def header_json(self) -> str: ...

def deploy_kernels() -> list[str]:
    """Binary-conv kernels this CPU runs, best first ("portable" always)."""
