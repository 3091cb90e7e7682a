"""The training loop's per-step path reads nothing back to the host (the meters add up
on the device and are read at print intervals), and the figures it prints are the ones
a read per step would give, to the bit."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

import ovsw
from conftest import tiny_net
from ovsw.train import loop


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
        for n in sizes
    ]


def _args(print_freq):
    return argparse.Namespace(limit_batches=None, print_freq=print_freq)


def test_meters_equal_a_read_per_batch_to_the_bit():
    """What ``iterate`` returns equals the per-batch ``.item()`` accumulation it
    replaced: same float64 operations in the same order."""
    torch.manual_seed(0)
    model = tiny_net().eval()
    batches = _batches([5, 7, 3, 8, 6])
    got = loop.iterate(
        model, batches, torch.nn.CrossEntropyLoss(), torch.device("cpu"), _args(2), desc="t"
    )
    sums, n = [0.0, 0.0, 0.0], 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss = F.cross_entropy(out, y)
            maxk = min(5, out.shape[1])
            correct = out.topk(maxk, 1, True, True).indices.eq(y.view(-1, 1))
            a1 = 100.0 * correct[:, :1].any(1).float().mean().item()
            a5 = 100.0 * correct[:, :maxk].any(1).float().mean().item()
            for i, v in enumerate((loss.item(), a1, a5)):
                sums[i] += v * len(y)
            n += len(y)
    expected = tuple(s / n for s in sums)
    assert got == expected
    assert 0 < got[1] < 100  # not a degenerate case where any summation agrees
    assert loop.accuracy(out, y) == [a1, a5]


class _Reads:
    """Counts the tensor methods that copy to the host (a device sync on CUDA)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, __original=original, **k):
                self.count += 1
                return __original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("print_freq", [1000, 4])
def test_host_reads_do_not_grow_with_the_steps_between_prints(monkeypatch, print_freq):
    """A training pass (forward, loss, backward, OvSW step with AGS and SAD, meters)
    reads the host as often for 3 batches as for 12 when no print falls between them;
    with a print every 4 batches, only the prints add reads."""

    def reads(num_batches):
        torch.manual_seed(0)
        net = tiny_net()
        opt = ovsw.OvSW(
            torch.optim.SGD(net.parameters(), lr=0.1),
            net,
            enable_ags=True,
            enable_dampen=True,
            dampen_weight=1e-3,
        )

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()

        batches = _batches([4] * num_batches)
        with monkeypatch.context() as patched:
            counter = _Reads(patched)
            loop.iterate(
                net.train(),
                batches,
                torch.nn.CrossEntropyLoss(),
                torch.device("cpu"),
                _args(print_freq),
                desc="t",
                step=step,
                on_log=lambda i, total, loss: loss.item(),
            )
        return counter.count

    few, many = reads(3), reads(12)
    if print_freq == 1000:
        # Prints at the first and the last batch only.
        assert few == many
    else:
        # Prints at batches 0, 4, 8 and 11 instead of 0 and 2: two more, each reading
        # the loss and top-1 meters and the logged loss.
        assert many - few == 2 * 3
    assert few > 0  # the counter sees the reads that do happen
