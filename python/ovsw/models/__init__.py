"""The OvSW architectures (SPEC section 4), by name.

>>> model = ovsw.models.create("cResNet20_1w1a", num_classes=10, act_w="ste")

Each factory takes ``num_classes`` and the binary-conv options ``act_a``, ``act_w``,
``scaling_factor`` and ``forward_type``, which go to every :class:`~ovsw.OvSWConv2d`.
Stems, downsample convs and heads are plain full-precision ``torch.nn`` layers.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ._utils import check_num_classes
from .cifar_resnet import cResNet18_1w1a, cResNet20_1w1a
from .resnet import ResNet18_1w1a, ResNet34_1w1a
from .vgg import VGGSmall_1w1a

__all__ = [
    "cResNet20_1w1a",
    "cResNet18_1w1a",
    "VGGSmall_1w1a",
    "ResNet18_1w1a",
    "ResNet34_1w1a",
    "names",
    "create",
]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "cResNet20_1w1a": cResNet20_1w1a,
    "cResNet18_1w1a": cResNet18_1w1a,
    "VGGSmall_1w1a": VGGSmall_1w1a,
    "ResNet18_1w1a": ResNet18_1w1a,
    "ResNet34_1w1a": ResNet34_1w1a,
}


def names() -> list[str]:
    """The architecture names :func:`create` accepts."""
    return list(_FACTORIES)


def create(
    name: str,
    num_classes: int | None = None,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    **kwargs,
) -> nn.Module:
    """Build architecture ``name`` (one of :func:`names`).

    ``num_classes`` defaults to the architecture's own default (10 for the CIFAR
    networks, 1000 for the ImageNet ones). ``act_a``, ``act_w``, ``scaling_factor`` and
    any further keyword (``forward_type``) go to every binary conv.

    Raises:
        ValueError: unknown ``name``, or ``num_classes`` not a positive integer.
    """
    try:
        factory = _FACTORIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown architecture {name!r}; choose one of: {', '.join(_FACTORIES)}"
        ) from None
    if num_classes is not None:
        kwargs["num_classes"] = check_num_classes(num_classes)
    return factory(act_a=act_a, act_w=act_w, scaling_factor=scaling_factor, **kwargs)
