import pytest
import torch
from torch import nn

import ovsw


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
