"""Datasets. For now: scikit-learn's bundled 8x8 digits, upscaled to 3x32x32 (the
embedded default data set: it ships inside scikit-learn, so it needs no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["digits"]


def digits(train: bool, *, val_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's 1,797 handwritten digits as CIFAR-shaped tensors.

    Images (8x8, values 0..16) are scaled to [0, 1], bilinearly upscaled to 32x32,
    repeated to three channels and normalised to zero mean and unit variance over the
    whole set. A fixed, class-stratified split gives ``val_fraction`` of every class to
    validation; ``train`` picks which side to return.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        ) from e
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = F.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()

    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_mask[idx[: int(round(len(idx) * val_fraction))]] = True
    keep = ~val_mask if train else val_mask
    return TensorDataset(x[keep], labels[keep])
