"""What the benchmarks share: the machine's name for their reports, and the OvSW settings
of upstream's ImageNet scripts (delta 0.01, lambda 2e-5) that they time."""

from __future__ import annotations

import platform

#: upstream's ImageNet OvSW settings (SPEC 3).
OVSW_IMAGENET = dict(
    enable_ags=True,
    delta=0.01,
    enable_dampen=True,
    dampen_weight=2e-5,
    track_momentum=0.999,
    track_threshold=1e-4,
)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
