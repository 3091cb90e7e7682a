"""The fused CUDA routes of ``ovsw._core`` wired in from Python, for tests and benchmarks.

Until the core routes CUDA tensors to its kernels by itself, :func:`fused` swaps the
explicit ``_core.cuda_binary_conv2d_forward/backward`` in for the public ops (every
``OvSWConv2d`` then runs the kernels, or raises where they do not apply), and
:class:`FusedOvSW` applies AGS+SAD with ``_core.cuda_ags_sad_step``, keeping the
figures on the device. :func:`libtorch` turns the kernels off so that the public ops
take the libtorch path, whichever way they are wired.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

import ovsw
from ovsw import _core


@contextlib.contextmanager
def fused():
    """Within the block, the binary conv's forward and backward run the fused kernels."""
    saved = (_core.binary_conv2d_forward, _core.binary_conv2d_backward)
    _core.binary_conv2d_forward = _core.cuda_binary_conv2d_forward
    _core.binary_conv2d_backward = _core.cuda_binary_conv2d_backward
    try:
        yield
    finally:
        _core.binary_conv2d_forward, _core.binary_conv2d_backward = saved


@contextlib.contextmanager
def libtorch():
    """Within the block, the public ops take the libtorch path."""
    was = _core.cuda_enabled()
    _core.cuda_set_enabled(False)
    try:
        yield
    finally:
        _core.cuda_set_enabled(was)


class FusedOvSW(ovsw.OvSW):
    """``ovsw.OvSW`` whose AGS+SAD runs ``_core.cuda_ags_sad_step``: two launches for all
    layers, no host sync; :meth:`stats` reads the ``[L, 2]`` figures when called."""

    @torch.no_grad()
    def apply_ags_sad(self) -> list[dict[str, Any]]:
        active = [(n, m) for n, m in self.layers if m.weight.grad is not None]
        cfg = self.config
        self._figures = _core.cuda_ags_sad_step(
            cfg,
            [m.weight.grad for _, m in active],
            [m.weight for _, m in active],
            [m.tracker if cfg.enable_dampen else None for _, m in active],
            [m.weight_prev if cfg.enable_dampen else None for _, m in active],
        )
        self._active = [n for n, _ in active]
        return []

    def stats(self) -> list[dict[str, Any]]:
        rows = self._figures.cpu().tolist()
        by_name = dict(zip(self._active, rows))

        def value(v):
            return None if math.isnan(v) else v

        return [
            {
                "name": n,
                "ags_ratio": value(by_name[n][0]) if n in by_name else None,
                "silent_ratio": value(by_name[n][1]) if n in by_name else None,
            }
            for n, _ in self.layers
        ]
