"""Type stubs for ovsw._core, the Rust core (src/lib.rs)."""

import numpy as np
from torch import Tensor

__version__: str

_Pair = tuple[int, int]

class ConvSpec:
    """Options of a binary convolution, validated once (unknown names raise ValueError)."""

    def __init__(
        self, act_a: str = "binary", act_w: str = "ste", forward_type: str = "xnor"
    ) -> None: ...
    @property
    def act_a(self) -> str: ...
    @property
    def act_w(self) -> str: ...
    @property
    def forward_type(self) -> str: ...

class OvSWConfig:
    """AGS and SAD settings; negative delta/dampen_weight/track_threshold or a
    track_momentum outside [0, 1) raise ValueError."""

    def __init__(
        self,
        enable_ags: bool = False,
        delta: float = 0.01,
        enable_dampen: bool = False,
        dampen_weight: float = 0.0,
        track_momentum: float = 0.999,
        track_threshold: float = 1e-4,
        track_ones: bool = False,
    ) -> None: ...
    enable_ags: bool
    delta: float
    enable_dampen: bool
    dampen_weight: float
    track_momentum: float
    track_threshold: float
    track_ones: bool

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
) -> list[tuple[float | None, float | None]]:
    """AGS then SAD in place; one (ags_ratio, silent_ratio) per layer."""

# -- deploy engine (src/deploy/, wrapped by ovsw.deploy) ----------------------------------

class DeployEngine:
    """A network from an ovsw.deploy file; runs without PyTorch on its own thread pool.

    Raises ValueError for a corrupt, truncated or unsupported file, an unknown kernel or
    threads < 1.
    """

    def __init__(self, data: bytes, threads: int, kernel: str = "auto") -> None: ...
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
    def ops(self) -> list[tuple[str, str]]: ...
    @property
    def header_json(self) -> str: ...

def deploy_kernels() -> list[str]:
    """Binary-conv kernels this CPU runs, best first ("portable" always)."""

# -- CUDA kernels (src/cuda/py.rs); each raises RuntimeError where the kernels do not apply

def cuda_status() -> dict[str, object]:
    """Keys: enabled; nvrtc (path or None), nvrtc_version or nvrtc_error; driver_version
    or driver_error."""

def cuda_compile(arch: int) -> tuple[str, bytes, str, list[str]]:
    """Compile every kernel for sm_{arch}: (ptx, cubin, nvrtc log, PTX entry points)."""

def cuda_entry_points() -> list[str]: ...
def cuda_set_enabled(on: bool) -> None: ...
def cuda_enabled() -> bool: ...
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

def cuda_binary_conv2d_forward(
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
    """binary_conv2d_forward through the fused kernels."""

def cuda_binary_conv2d_backward(
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
    """binary_conv2d_backward through the fused kernels."""

def cuda_ags_sad_step(
    config: OvSWConfig,
    grads: list[Tensor],
    weights: list[Tensor],
    trackers: list[Tensor | None],
    weight_prevs: list[Tensor | None],
    stream: int | None = None,
) -> Tensor:
    """AGS then SAD in two launches; float64 [L, 2] figures on the device (NaN: disabled)."""
