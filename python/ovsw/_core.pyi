"""Type stubs for ovsw._core, the Rust core (src/lib.rs; checked against the compiled
module by tests/test_stubs.py)."""

import os
from collections.abc import Sequence
from typing import Literal, TypedDict, final

import numpy as np
from torch import Tensor
from typing_extensions import Self, disjoint_base

__version__: str

__all__ = [
    "ConvSpec",
    "act_w_names",
    "act_a_names",
    "forward_type_names",
    "binary_conv2d_forward",
    "binary_conv2d_backward",
    "binary_linear_forward",
    "binary_linear_backward",
    "binarize_weight",
    "channel_abs_mean",
    "channel_alpha",
    "OvSWConfig",
    "ovsw_options",
    "ovsw_check_option",
    "sad_initial_state",
    "ags_sad_step",
    "flip_monitor_state",
    "flip_monitor_step",
    "FlipMonitorConfig",
    "DeployEngine",
    "deploy_threads",
    "deploy_kernels",
    "deploy_cpu_flags",
    "deploy_kernel",
    "cuda_status",
    "cuda_compile",
    "cuda_entry_points",
    "cuda_set_enabled",
    "cuda_enabled",
    "cuda_set_host_launcher",
    "cuda_host_launcher",
    "cuda_host_kernels",
    "cuda_route_counts",
    "cuda_conv_mode",
    "cuda_binarize_activation",
    "cuda_bireal_backward",
    "cuda_weight_operand",
    "cuda_weight_grads",
    "deploy_pack_signs",
    "deploy_fold_batchnorm",
    "deploy_fold_conv2d",
    "deploy_fold_bconv2d",
    "deploy_write",
    "DEPLOY_FORMAT_VERSION",
    "__version__",
]

_Pair = Sequence[int]  # two entries
_Four = tuple[Tensor, Tensor, Tensor, Tensor]

@final
class ConvSpec:
    """Options of a binary layer (conv or linear), validated once (unknown names raise
    ValueError)."""

    def __new__(
        cls, act_a: str = "binary", act_w: str = "ste", forward_type: str = "xnor"
    ) -> Self: ...
    @property
    def act_a(self) -> str: ...
    @property
    def act_w(self) -> str: ...
    @property
    def forward_type(self) -> str: ...

@disjoint_base
class OvSWConfig:
    """AGS and SAD settings, validated against the option table (``ovsw_options()``):
    an unknown name or a wrong type raises TypeError, a value outside its range
    ValueError. Options go by keyword, or by position in table order. Equal and hashed
    by value; subclassable (``ovsw.ops.OvSWConfig`` is the op's opaque argument)."""

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
    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

class _OvSWOption(TypedDict):
    """One entry of ``ovsw_options()``."""

    name: str
    type: Literal["bool", "float"]
    default: bool | float
    min: float | None
    min_inclusive: bool
    max: float | None
    max_inclusive: bool
    range: str | None
    help: str

def ovsw_options() -> list[_OvSWOption]:
    """The OvSW options in constructor order: name, type, default, valid range (floats
    must also be finite) and its text (None for a flag), and a line of help. The one
    definition they all derive from."""

def ovsw_check_option(name: str, value: bool | float) -> None:
    """Checks one value of an option as ``OvSWConfig`` does, raising its error
    (TypeError for an unknown name or a wrong type, ValueError outside the range)."""

def act_w_names() -> list[str]:
    """The weight binarizers (``act_w``)."""

def act_a_names() -> list[str]:
    """The activation binarizers (``act_a``)."""

def forward_type_names() -> list[str]:
    """The forward types (``forward_type``)."""

# The bodies of the torch.ops.ovsw custom ops (python/ovsw/ops.py documents the
# schemas). An absent tensor is an "absent marker": a 1-D tensor of zero elements.

def binary_conv2d_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    act_w: str,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    groups: int,
    training: bool,
) -> _Four:
    """(y, std, alpha, conv_out): std absent in eval mode, alpha with a learnable scale;
    conv_out kept only with one, else absent in the dtype the convolution ran in."""

def binary_conv2d_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    scale: Tensor | None,
    std: Tensor,
    alpha: Tensor,
    conv_out: Tensor,
    act_w: str,
    stride: _Pair,
    padding: _Pair,
    dilation: _Pair,
    groups: int,
    needs: Sequence[bool],
) -> _Four:
    """Gradients of (x, weight, bias, scale); absent where ``needs`` is false."""

def binary_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    act_w: str,
    training: bool,
) -> _Four:
    """(y, std, alpha, product) of the binary linear layer, as binary_conv2d_forward."""

def binary_linear_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    scale: Tensor | None,
    std: Tensor,
    alpha: Tensor,
    product: Tensor,
    act_w: str,
    needs: Sequence[bool],
) -> _Four:
    """Gradients of (x, weight, bias, scale); absent where ``needs`` is false."""

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

@final
class FlipMonitorConfig:
    """How a flip monitor runs, checked once when built against SAD's option ranges
    (ValueError naming the option otherwise) and handed to every flip_monitor_step."""

    def __new__(
        cls, track_momentum: float, track_threshold: float, update_trackers: bool
    ) -> FlipMonitorConfig: ...
    @property
    def track_momentum(self) -> float: ...
    @property
    def track_threshold(self) -> float: ...
    @property
    def update_trackers(self) -> bool: ...

def flip_monitor_step(
    weights: list[Tensor],
    signs: list[Tensor],
    ever_flipped: list[Tensor],
    trackers: list[Tensor],
    rates: Tensor,
    step: int,
    config: FlipMonitorConfig,
) -> Tensor:
    """One monitoring step after an optimizer update, in place on signs, ever_flipped,
    rates (float64 [L]) and, with config.update_trackers, the trackers. Returns float64 [L, 4]
    on the weights' device (flipped, never flipped, silent, bias-corrected flip rate),
    with no device-to-host copy."""

# -- deploy engine (crates/ovsw-engine/, bound in src/deploy/, wrapped by ovsw.deploy) --

@final
class DeployEngine:
    """A network from an ovsw.deploy file; runs without PyTorch on its own thread pool.

    Raises ValueError for a corrupt, truncated or unsupported file, an unknown kernel or
    one this CPU cannot run (naming the missing CPU flag), or threads < 1 or above the
    CPUs this process may use (see deploy_threads).
    """

    def __new__(cls, data: bytes, threads: int, kernel: str = "auto") -> Self: ...
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW in; (N, K) out when the result is 1x1, else NCHW."""
    def profile(
        self, x: np.ndarray
    ) -> tuple[np.ndarray, list[tuple[str, str, tuple[int, int, int, int], float]]]:
        """Output and (name, op, output NCHW shape, seconds) per op."""
    def run_op(self, name: str, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """The single op `name` on `x` (and `residual`)."""
    threads: int
    @property
    def kernel(self) -> str: ...
    @property
    def input_channels(self) -> int: ...
    @property
    def accepts_any_size(self) -> bool:
        """Whether the network takes inputs of any height and width, not only the size
        it was exported for."""
    @property
    def ops(self) -> list[tuple[str, str]]: ...
    @property
    def header_json(self) -> str: ...

def deploy_threads(threads: int | None = None) -> int:
    """The CPUs this process may use (its CPU affinity and CPU quota) when `threads` is
    None, else `threads` once checked: ValueError for 0 or more than those CPUs (the
    engine's one check of a thread count)."""

def deploy_kernels() -> list[str]:
    """Binary-conv kernels this CPU runs, best first ("portable" always).

    Raises ValueError when OVSW_DISABLE_CPU_FEATURES names an unknown flag.
    """

def deploy_kernel(name: str) -> str:
    """The kernel `name` selects on this CPU ("auto": the best).

    Raises ValueError for an unknown name, or a kernel this CPU cannot run (naming the
    missing CPU flag).
    """

def deploy_cpu_flags() -> list[str]:
    """The CPU flags the kernels use that this CPU has, as /proc/cpuinfo names them
    (less those OVSW_DISABLE_CPU_FEATURES hides)."""

# -- CUDA kernels (src/cuda/py.rs). The library's ops (binary_conv2d_forward/_backward,
# ags_sad_step) choose them on CUDA tensors by themselves; the four passes below ask for
# them explicitly and raise RuntimeError where they do not apply.

def cuda_status() -> dict[str, object]:
    """Keys: enabled; nvrtc (path or None), nvrtc_version or nvrtc_error; driver_version
    or driver_error."""

def cuda_compile(arch: int) -> tuple[str, bytes, str, list[str]]:
    """Compile every kernel for sm_{arch}: (ptx, cubin, nvrtc log, PTX entry points)."""

def cuda_entry_points() -> list[str]: ...
def cuda_set_enabled(on: bool) -> None: ...
def cuda_enabled() -> bool: ...
def cuda_set_host_launcher(on: bool) -> None:
    """Select (or not) the host launcher for the process: CPU tensors in float32,
    float16 and bfloat16 then take the CUDA route, its kernels compiled for the CPU
    (tests without a GPU). RuntimeError where ovsw was built without them."""

def cuda_host_launcher() -> bool:
    """Whether the host launcher is selected (for the calling thread)."""

def cuda_host_kernels() -> list[str]:
    """The kernels compiled for the CPU (empty without the cuda-host feature)."""

def cuda_route_counts() -> dict[str, dict[str, int | str | None]]:
    """Per op with a fused form: {"fused": n, "declined": n, "last_declined": reason}."""

def cuda_conv_mode() -> tuple[str | None, bool]:
    """(CUDA autocast dtype or None, whether cuDNN may run float32 convs in TF32)."""

def cuda_binarize_activation(
    x: Tensor,
    training: bool,
    out_dtype: str,
    std: Tensor | None = None,
    stream: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(sign(x / std) in out_dtype, per-sample std [N,1,1,1] when computed here)."""

def cuda_bireal_backward(
    grad_a: Tensor, x: Tensor, std: Tensor | None = None, stream: int | None = None
) -> Tensor:
    """grad_a * max(0, 2 - 2|x/std|) / std in x's dtype and layout."""

def cuda_weight_operand(
    weight: Tensor,
    act_w: str,
    scale: Tensor | None,
    bias: Tensor | None,
    fold: bool,
    out_dtype: str,
    stream: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(w_eff, alpha, bias_eff): w_b (times the scale when fold), alpha when no scale."""

def cuda_weight_grads(
    grad_weff: Tensor | None,
    grad_beff: Tensor | None,
    weight: Tensor,
    act_w: str,
    s: Tensor,
    bias: Tensor | None,
    want: tuple[bool, bool, bool],
    stream: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_weight, grad_scale, grad_bias) from the gradients of the folded operands."""

# -- export lowering (src/deploy/from_torch.rs, called by ovsw.deploy.export) -------------

def deploy_pack_signs(weight: Tensor) -> tuple[np.ndarray, np.ndarray | None]:
    """Sign bits of a conv weight [O, C, kh, kw] (read as float32) as uint64
    [O, kh, kw, ceil(C/64)], bit c % 64 of word c // 64 set where the weight is negative,
    and the non-zero mask alike, or None when no weight is zero.

    Raises TypeError for a non-floating weight, ValueError for one that is not 4-D.
    """

def deploy_fold_batchnorm(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 (k, c) with bn(x) == k * x + c per channel for a BatchNorm in eval mode.

    Raises ValueError when the tensors are not 1-D of one length.
    """

def deploy_fold_conv2d(
    weight: Tensor, bias: Tensor | None, bn: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """A float conv's float32 weight [O, kh, kw, C/groups] and bias [O] with the
    BatchNorm fold bn = (k, c) applied (bias None without a bias or bn)."""

def deploy_fold_bconv2d(
    weight: Tensor,
    scaling_factor: Tensor | None,
    bias: Tensor | None,
    act_w: str,
    bn: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """A binary conv's float32 (scale, shift) [O]: scale alpha (scaling_factor or the
    W-derived alpha, SPEC 1.4) times mean|W| for ste_v2, shift alpha * bias, then the
    BatchNorm fold bn = (k, c) applied.

    Raises ValueError for an unknown act_w or vectors whose length is not O.
    """

# -- the deploy file (crates/ovsw-engine/src/writer.rs, called by ovsw.deploy.export) -----

DEPLOY_FORMAT_VERSION: int
"""The deploy file format version the engine writes and reads."""

def deploy_write(
    path: str | os.PathLike[str],
    metadata: str,
    tensors: Sequence[tuple[str, np.ndarray]],
    ops: str,
    output: int,
) -> int:
    """Writes a deploy file to path atomically (a temporary file beside it, renamed into
    place): the header's metadata (a JSON object's text), the tensors (name, float32 or
    uint64 array) in table order at 64-byte-aligned offsets, ops (a JSON array's text)
    and the output value, then the CRC-32. Returns the bytes written.

    Raises ValueError for malformed JSON, a reserved metadata key or a duplicated
    tensor name, TypeError for an array of another dtype, OSError when the file cannot
    be written.
    """
