"""One sample's logits do not depend on its batch (issue 22, item 7): bit for bit the
same alone, in batches of 3, 8 and 64 at every position, at 1 and 2 engine threads,
with every binary-conv kernel this CPU runs. The engine computes each sample on its
own (no op mixes samples, no reduction's order depends on the batch or on how the work
is split over threads); this holds it to that, for the three architectures the
benchmark measures and a binarized torchvision MobileNetV2."""

from __future__ import annotations

import numpy as np
import pytest

import ovsw.deploy as deploy
from ovsw import _core
from ovsw.deploy._bench import calibrated

#: (arch, input size): ResNet18 takes any size (a global average pool before its head),
#: so a small input keeps the test quick. "mobilenet_v2" is torchvision's, through
#: ``ovsw.binarize``: its depthwise convs take the grouped route, and its ReLU6 gives
#: the binary convs exact zeros (the masked kernels).
ARCHS = [
    ("cResNet20_1w1a", 32),
    ("VGGSmall_1w1a", 32),
    ("ResNet18_1w1a", 64),
    ("mobilenet_v2", 32),
]
THREADS = (1, 2)
KERNELS = deploy.kernels()
SAMPLES = 64


def assert_same_rows(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """``got`` equals ``want`` bit for bit; the message names the samples that differ."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    differ = [i for i in range(len(want)) if not np.array_equal(got[i], want[i])]
    assert not differ, f"{what}: samples {differ} differ from the same samples alone"


def in_batches(engine, x: np.ndarray, first: int, size: int) -> np.ndarray:
    """The logits of ``x`` computed in batches: ``x[:first]``, then ``size`` at a time
    (the last batch shorter), concatenated; each sample so sits at another position."""
    starts = [0, *range(first, len(x), size)] if first else list(range(0, len(x), size))
    bounds = [*starts, len(x)]
    return np.concatenate([engine(x[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a])


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def exported(request, tmp_path_factory):
    arch, size = request.param
    if arch == "mobilenet_v2":
        pytest.importorskip("torchvision")
        from ovsw.deploy._bench import converted

        model = converted(arch)
    else:
        model = calibrated(arch, size)
    path = deploy.export(model, tmp_path_factory.mktemp("batch") / f"{arch}.ovsw", input_size=size)
    x = np.random.default_rng(7).standard_normal((SAMPLES, 3, size, size), dtype=np.float32)
    # Each sample alone, at 1 thread and the best kernel: the reference every other way
    # must match (the kernels agree bit for bit: test_deploy.py).
    alone = np.concatenate([deploy.load(path, threads=1)(x[i : i + 1]) for i in range(SAMPLES)])
    return path, x, alone


def test_the_check_sees_one_ulp():
    # The comparison is exact: one logit one float step away is a difference.
    want = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    got = want.copy()
    got[2, 3] = np.nextafter(got[2, 3], np.float32(np.inf))
    with pytest.raises(AssertionError, match=r"samples \[2\] differ"):
        assert_same_rows(got, want, "planted")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", THREADS)
def test_a_sample_gets_the_same_logits_in_any_batch(exported, threads, kernel):
    if threads > _core.deploy_threads():
        pytest.skip(f"this process may use {_core.deploy_threads()} CPU(s)")
    path, x, alone = exported
    engine = deploy.load(path, threads=threads, kernel=kernel)
    # finite, and no two samples alike (a sample given another's logits would show)
    assert np.isfinite(alone).all() and len({row.tobytes() for row in alone}) == SAMPLES
    assert_same_rows(engine(x), alone, f"batch of {SAMPLES}, {threads} threads")
    for size, first in [(1, 0), (3, 0), (3, 2), (8, 0), (8, 5)]:
        got = in_batches(engine, x, first, size)
        assert_same_rows(got, alone, f"batches of {size} after {first}, {threads} threads")
