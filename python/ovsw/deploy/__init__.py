"""Deploy trained 1-bit networks: bit-packed export and an XNOR-popcount CPU engine.

::

    import ovsw.deploy

    model.eval()
    ovsw.deploy.export(model, "resnet18.ovsw")          # 1 bit per binary weight
    engine = ovsw.deploy.load("resnet18.ovsw", threads=2)
    logits = engine(images)                              # float32 NCHW numpy -> (N, K)

The engine is Rust (``ovsw._core``) and does not use PyTorch: binary convolutions run
as XNOR + popcount over 64-bit words (AVX-512 VPOPCNTDQ, AVX-512BW, AVX2 or ``popcnt``
where the CPU has them, see :func:`kernels`), the few full-precision layers as float32
GEMMs, on a thread pool of the size you choose.
Its logits equal ``model.eval()``'s up to float rounding. ``python -m ovsw.deploy
bench`` measures it against PyTorch on your machine. The file format is documented in
:mod:`ovsw.deploy._export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import _core
from ._export import FORMAT_VERSION, export
from ._ops import pack_signs

__all__ = [
    "export",
    "load",
    "Engine",
    "OpTime",
    "kernels",
    "cpu_flags",
    "FORMAT_VERSION",
    "pack_signs",
]


class OpTime(NamedTuple):
    """One op's share of :meth:`Engine.profile`."""

    name: str
    op: str
    shape: tuple[int, int, int, int]
    seconds: float


def kernels() -> list[str]:
    """The binary-conv kernels this CPU can run, best first (``"portable"`` always).

    ``"avx512_vpopcntdq"`` (AVX-512F and VPOPCNTDQ), ``"avx512bw"`` (AVX-512F and BW,
    nibble-table popcount), ``"avx2"``, ``"popcnt"`` and ``"portable"``. Pass one as
    ``kernel=`` to :func:`load` to force it; one this CPU lacks is refused with a
    ``ValueError`` naming the missing CPU flag. The environment variable
    ``OVSW_DISABLE_CPU_FEATURES`` (flags as ``/proc/cpuinfo`` names them, e.g.
    ``"avx512_vpopcntdq avx512bw"``) hides flags, to see what a CPU without them runs.
    """
    return list(_core.deploy_kernels())


def cpu_flags() -> list[str]:
    """The CPU flags the kernels use that this CPU has, as ``/proc/cpuinfo`` names them
    (``popcnt``, ``avx2``, ``avx512f``, ``avx512bw``, ``avx512_vpopcntdq``), less those
    ``OVSW_DISABLE_CPU_FEATURES`` hides."""
    return list(_core.deploy_cpu_flags())


class Engine:
    """A network loaded by :func:`load`; call it on a float32 NCHW numpy array.

    Calls release the GIL and run on the engine's own thread pool.
    """

    def __init__(self, data: bytes, *, threads: int | None = None, kernel: str = "auto"):
        self._engine = _core.DeployEngine(data, _threads(threads), kernel)
        header = json.loads(self._engine.header_json)
        #: The file's metadata: format, version, producer, arch, input, num_classes, ...
        self.metadata: dict = {
            k: v for k, v in header.items() if k not in ("tensors", "ops", "output")
        }
        self._ops: list[dict] = header["ops"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, num_classes)`` for ``x`` of shape ``(N, C, H, W)``, float32
        (``H, W`` the exported size unless :attr:`accepts_any_size`)."""
        return self._engine(x)

    def profile(self, x: np.ndarray) -> tuple[np.ndarray, list[OpTime]]:
        """Runs ``x`` once and returns the output and each op's wall time."""
        y, times = self._engine.profile(x)
        return y, [OpTime(*t) for t in times]

    def run_op(self, name: str, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """Runs the single op ``name`` (see :attr:`ops`) on ``x``, and ``residual`` for a
        binary conv that adds one: float32 NCHW in, NCHW out (``(N, C)`` when 1x1).
        For checking an op against the layers it was exported from."""
        return self._engine.run_op(name, x, residual)

    @property
    def threads(self) -> int:
        """Size of the engine's thread pool (settable, 1 to the CPUs this process may
        use; ``ValueError`` naming both numbers above them)."""
        return self._engine.threads

    @threads.setter
    def threads(self, value: int) -> None:
        self._engine.threads = _threads(value)

    @property
    def kernel(self) -> str:
        """The binary-conv kernel in use (one of :func:`kernels`)."""
        return self._engine.kernel

    @property
    def accepts_any_size(self) -> bool:
        """Whether the network takes inputs of any height and width (large enough for
        its kernels), not only the size it was exported for (``metadata["input"]``):
        true unless a flatten or linear layer reads features whose count depends on
        the input size (a global average pool before the head makes it independent).
        An input the network cannot take is refused before any layer runs, with a
        ``ValueError`` naming the exported size or the layer."""
        return self._engine.accepts_any_size

    @property
    def ops(self) -> list[tuple[str, str]]:
        """``(name, op)`` of every op in execution order."""
        return list(self._engine.ops)

    @property
    def graph(self) -> list[dict]:
        """The ops as stored in the file: kind, name, the values read (``x``,
        ``residual``; 0 is the input) and written (``y``), geometry and tensor names."""
        return [dict(op) for op in self._ops]

    def summary(self) -> str:
        """A table of the ops (name and kind), as a string, under a line with the input
        size (and whether any other is accepted), classes, kernel and threads."""
        rows = [f"{'#':>3}  {'op':<15} name"]
        rows += [f"{i:>3}  {op:<15} {name}" for i, (name, op) in enumerate(self.ops)]
        meta = self.metadata
        inp = meta.get("input", {})
        sizes = "any size accepted" if self.accepts_any_size else "this size only"
        rows.insert(
            0,
            f"{meta.get('arch', '?')}: input {inp.get('channels')}x{inp.get('height')}x"
            f"{inp.get('width')} ({sizes}), {meta.get('num_classes')} classes, "
            f"kernel {self.kernel}, {self.threads} threads",
        )
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (
            f"Engine(arch={self.metadata.get('arch')!r}, ops={len(self.ops)}, "
            f"kernel={self.kernel!r}, threads={self.threads})"
        )


def _threads(threads) -> int:
    """``threads`` once its type is checked, or the engine's default for ``None`` (the
    CPUs this process may use). Whether the count is too large the engine checks (one
    check, for every way in: ``load``, the ``threads`` setter, the command lines)."""
    if threads is None:
        return _core.deploy_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


def load(path: str | os.PathLike, *, threads: int | None = None, kernel: str = "auto") -> Engine:
    """Load a file written by :func:`export`.

    Args:
        path: the deploy file.
        threads: size of the engine's thread pool, at most the CPUs this process may use
            (its CPU affinity and CPU quota; the default).
        kernel: ``"auto"`` (best the CPU runs) or one of :func:`kernels`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a deploy file, or a corrupt, truncated or unsupported one; an
            unknown kernel, or one this CPU cannot run (the message names the missing
            CPU flag); ``threads`` below 1 or above the CPUs this process may use.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return Engine(data, threads=threads, kernel=kernel)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
