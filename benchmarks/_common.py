"""What the benchmarks share: the machine's name for their reports (the deploy bench's
``cpu_model``, one definition), and the OvSW settings of upstream's ImageNet scripts
(delta 0.01, lambda 2e-5) that they time."""

from __future__ import annotations

from ovsw.deploy._bench import cpu_model as cpu_name

__all__ = ["OVSW_IMAGENET", "cpu_name"]

#: upstream's ImageNet OvSW settings (SPEC 3).
OVSW_IMAGENET = dict(
    enable_ags=True,
    delta=0.01,
    enable_dampen=True,
    dampen_weight=2e-5,
    track_momentum=0.999,
    track_threshold=1e-4,
)
