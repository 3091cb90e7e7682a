import hashlib
import os

import pytest
import torch
from torch import nn

import ovsw


def _inductor_cache_per_isa() -> None:
    """Give inductor a cache folder of its own for each instruction set, unless the user
    chose one (``TORCHINDUCTOR_CACHE_DIR``).

    torch's FX graph cache does not key on the vector ISA ATen runs at: a graph cached
    under AVX-512 and served after ``ATEN_CPU_CAPABILITY=avx2`` (``scripts/test_avx2.sh``,
    a simulated Zen 3) or on another CPU sharing the folder gave a cResNet20 loss of 1e256
    in ``test_compile.py``, or a segfault in libgomp; an empty cache gave the right one.
    The folder name holds ATen's capability and a hash of the CPU's flags."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    # Imported only now: torch sets the variable to its default once it reads it.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    key = torch.backends.cpu.get_cpu_capability() + " " + " ".join(sorted(flags.split()))
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"ovsw-tests-{torch.backends.cpu.get_cpu_capability().lower()}-{tag}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), name)


_inductor_cache_per_isa()


def tiny_net(num_classes: int = 4, **conv_options) -> nn.Module:
    """A small network with two binary convs between full-precision ends."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        ovsw.OvSWConv2d(8, 8, 3, padding=1, **conv_options),
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        ovsw.OvSWConv2d(8, 16, 3, stride=2, padding=1, **conv_options),
        nn.BatchNorm2d(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def engine_threads(n: int = 2) -> int:
    """``n`` deploy-engine threads, or as many as this process may use where that is
    fewer: the engine refuses more (``threads=2`` in a process pinned to one CPU)."""
    return min(n, ovsw._core.deploy_threads())


@pytest.fixture
def net():
    torch.manual_seed(0)
    return tiny_net()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker itself: `"cuda" in item.keywords` also matches a checkout folder
        # named "cuda".
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
