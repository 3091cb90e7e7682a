"""torch.export of the five architectures (issue 13): ``torch.export.export(model.eval(),
(x,))`` records every binary conv as the ``ovsw::binary_conv2d`` op (traced by its fake
implementation), and the exported program's outputs equal eager mode's; the program
saves and loads as any other."""

from __future__ import annotations

import pytest
import torch

import ovsw
from ovsw import models

ARCHS = [
    ("cResNet20_1w1a", 32),
    ("cResNet18_1w1a", 32),
    ("VGGSmall_1w1a", 32),
    ("ResNet18_1w1a", 64),
    ("ResNet34_1w1a", 64),
]


def _trained_like(model):
    """BatchNorm statistics away from their init, so eval differs from train mode."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("arch, res", ARCHS)
def test_export_matches_eager(arch, res, tmp_path):
    torch.manual_seed(0)
    model = _trained_like(
        models.create(arch, num_classes=10, scaling_factor=arch == "VGGSmall_1w1a")
    )
    model.eval()
    x = torch.randn(2, 3, res, res)
    program = torch.export.export(model, (x,))
    convs = [
        n
        for n in program.graph.nodes
        if n.op == "call_function" and n.target == torch.ops.ovsw.binary_conv2d.default
    ]
    assert len(convs) == len(ovsw.binary_convs(model))
    with torch.no_grad():
        ref = model(x)
        y = program.module()(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    path = tmp_path / "program.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), ref, rtol=0, atol=0)


def test_export_with_a_dynamic_batch():
    torch.manual_seed(0)
    model = models.create("cResNet20_1w1a", num_classes=10).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    x = torch.randn(4, 3, 32, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    other = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other), rtol=0, atol=0)


def test_export_of_a_model_with_a_binary_linear_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        ovsw.OvSWLinear(48, 16, bias=True, scaling_factor=True),
        torch.nn.BatchNorm1d(16),
        torch.nn.Hardtanh(),
        torch.nn.Linear(16, 4),
    ).eval()
    x = torch.randn(5, 3, 4, 4)
    program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.ovsw.binary_linear.default in targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
