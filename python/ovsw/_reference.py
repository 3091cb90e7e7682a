"""AGS and SAD (SPEC sections 2 and 3) on one layer in plain torch ops: the reference.

This is the formula written once from the SPEC, with no call into ``ovsw._core``: the
test oracle (``tests/oracle.py``, ``oracle_ags_sad``) wraps it, and ``python -m
ovsw.cuda check`` runs it in float64 to judge the fused kernels' figures. It computes in
the dtype of the tensors it is given (pass float64 copies for an exact reference) and
reads nothing back to the host: the figures stay tensors on the tensors' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAD_NORM_FLOOR = 1e-6  # SPEC 2: g_o = max(||G_o||, 1e-6)
WEIGHT_NORM_FLOOR = 1e-3  # SPEC 2: w_o = max(||W_o||, 1e-3)


@torch.no_grad()
def ags_sad_layer(
    grad: Tensor,
    weight: Tensor,
    tracker: Tensor | None,
    weight_prev: Tensor | None,
    *,
    enable_ags: bool,
    delta: float,
    enable_dampen: bool,
    dampen_weight: float,
    track_momentum: float,
    track_threshold: float,
) -> tuple[Tensor | None, Tensor | None]:
    """AGS (SPEC 2) then SAD (SPEC 3) on one layer, in place on ``grad``, ``tracker``
    and ``weight_prev``.

    Returns ``(r, mask)``: the per-channel ratios ``r_o = g_o / w_o`` (shape ``[O]``)
    and the silent mask ``tracker < track_threshold`` (bool, the weight's shape), each
    ``None`` where its part is disabled. ``r.mean()`` is the layer's ``ags_ratio`` and
    ``mask.mean()`` its ``silent_ratio``.
    """
    r = mask = None
    o = weight.shape[0]
    if enable_ags:
        g = grad.reshape(o, -1).norm(p=2, dim=1).clamp_min(GRAD_NORM_FLOOR)
        w = weight.reshape(o, -1).norm(p=2, dim=1).clamp_min(WEIGHT_NORM_FLOOR)
        r = g / w
        factor = torch.where(r < delta, delta * w / g, torch.ones_like(r))
        grad.mul_(factor.reshape(o, *([1] * (weight.dim() - 1))))
    if enable_dampen:
        if tracker is None or weight_prev is None:
            raise ValueError("SAD needs tracker and weight_prev")
        m = track_momentum
        flipped = (torch.sign(weight) != torch.sign(weight_prev)).to(tracker.dtype)
        tracker.mul_(m).add_(flipped * (1.0 - m))
        mask = tracker < track_threshold
        grad.add_(dampen_weight * mask.to(weight.dtype) * weight)
        weight_prev.copy_(weight)
    return r, mask
