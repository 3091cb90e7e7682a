"""CIFAR ResNets with 1-bit weights and activations (SPEC section 4).

- :func:`cResNet20_1w1a`: ResNet-20 of He et al. (2016), widths 16/32/64, with the
  parameter-free "option A" shortcut (average pool + zero channel padding).
- :func:`cResNet18_1w1a`: the CIFAR variant of ResNet-18, widths 64/128/256/512, with a
  binary 1x1 projection shortcut ("option B").

Module names and registration order reproduce upstream's ``state_dict`` keys exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import apply_scaling_factor, binary_conv, check_num_classes

__all__ = [
    "PadShortcut",
    "BasicBlockA",
    "BasicBlockB",
    "CifarResNetA",
    "CifarResNetB",
    "cResNet20_1w1a",
    "cResNet18_1w1a",
]


class PadShortcut(nn.Module):
    """Parameter-free shortcut: ``AvgPool2d(stride)`` then ``pad`` zero channels on each
    side (so C -> C + 2 * pad). ``stride=1`` skips the pooling."""

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = int(pad)
        self.stride = int(stride)
        self.pool = nn.AvgPool2d(self.stride) if self.stride != 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class BasicBlockA(nn.Module):
    """cResNet20 block, a shortcut around each binary conv::

        out = hardtanh(bn1(conv1(x)) + shortcut(x))
        out = hardtanh(bn2(conv2(out)) + out)

    ``shortcut`` is :class:`PadShortcut` (``planes // 4`` channels each side) when the
    stride or the width changes, the identity otherwise.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **conv_options) -> None:
        super().__init__()
        self.conv1 = binary_conv(in_planes, planes, 3, stride, 1, **conv_options)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = binary_conv(planes, planes, 3, 1, 1, **conv_options)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = PadShortcut(planes // 4, stride)
        else:
            self.shortcut = nn.Identity()
        self.act1 = nn.Hardtanh()
        self.act2 = nn.Hardtanh()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)) + self.shortcut(x))
        out = self.act2(self.bn2(self.conv2(out)) + out)
        return out


class BasicBlockB(nn.Module):
    """cResNet18 block::

        out = hardtanh(bn1(conv1(x)))
        out = hardtanh(bn2(conv2(out)) + shortcut(x))

    ``shortcut`` is ``Sequential(binary 1x1 conv (stride), BatchNorm2d)`` when the stride
    or the width changes, the identity otherwise.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, **conv_options) -> None:
        super().__init__()
        self.conv1 = binary_conv(in_planes, planes, 3, stride, 1, **conv_options)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = binary_conv(planes, planes, 3, 1, 1, **conv_options)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                binary_conv(in_planes, planes, 1, stride, 0, **conv_options),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.act1 = nn.Hardtanh()
        self.act2 = nn.Hardtanh()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))
        return out


def _make_stage(block, in_planes, planes, num_blocks, stride, conv_options):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
        layers.append(block(in_planes, planes, s, **conv_options))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


class CifarResNetA(nn.Module):
    """ResNet for 32x32 inputs with :class:`BasicBlockA` blocks (cResNet20 family).

    Forward: ``hardtanh(bn1(conv1(x)))`` (full-precision 3x3 stem, 3 -> 16), three
    stages of widths 16/32/64 and strides 1/2/2, global average pool, ``bn2``
    (BatchNorm1d 64), ``linear``.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (3, 3, 3),
        num_classes: int = 10,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if len(num_blocks) != 3:
            raise ValueError(f"CifarResNetA has 3 stages, got num_blocks={list(num_blocks)}")
        conv_options = dict(act_a=act_a, act_w=act_w, forward_type=forward_type)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = nn.Hardtanh()
        in_planes = 16
        self.layer1, in_planes = _make_stage(
            BasicBlockA, in_planes, 16, num_blocks[0], 1, conv_options
        )
        self.layer2, in_planes = _make_stage(
            BasicBlockA, in_planes, 32, num_blocks[1], 2, conv_options
        )
        self.layer3, in_planes = _make_stage(
            BasicBlockA, in_planes, 64, num_blocks[2], 2, conv_options
        )
        self.bn2 = nn.BatchNorm1d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        apply_scaling_factor(self, scaling_factor)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        # Global average pool as upstream computes it: avg_pool2d over the whole map
        # (AdaptiveAvgPool2d rounds differently in the last bit).
        out = F.avg_pool2d(out, tuple(out.shape[-2:])).flatten(1)
        out = self.bn2(out)
        return self.linear(out)


class CifarResNetB(nn.Module):
    """ResNet for 32x32 inputs with :class:`BasicBlockB` blocks (cResNet18 family).

    Forward: ``bn1(conv1(x))`` (full-precision 3x3 stem, 3 -> 64, no activation), four
    stages of widths 64/128/256/512 and strides 1/2/2/2, ``avgpool``
    (AdaptiveAvgPool2d(1)), ``bn2`` (BatchNorm2d 512), ``fc`` (a 1x1 ``nn.Conv2d`` with
    bias), flatten.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if len(num_blocks) != 4:
            raise ValueError(f"CifarResNetB has 4 stages, got num_blocks={list(num_blocks)}")
        conv_options = dict(act_a=act_a, act_w=act_w, forward_type=forward_type)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        self.layer1, in_planes = _make_stage(
            BasicBlockB, in_planes, 64, num_blocks[0], 1, conv_options
        )
        self.layer2, in_planes = _make_stage(
            BasicBlockB, in_planes, 128, num_blocks[1], 2, conv_options
        )
        self.layer3, in_planes = _make_stage(
            BasicBlockB, in_planes, 256, num_blocks[2], 2, conv_options
        )
        self.layer4, in_planes = _make_stage(
            BasicBlockB, in_planes, 512, num_blocks[3], 2, conv_options
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm2d(in_planes)
        self.fc = nn.Conv2d(in_planes, num_classes, kernel_size=1, bias=True)
        apply_scaling_factor(self, scaling_factor)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = self.avgpool(out)
        out = self.bn2(out)
        out = self.fc(out)
        return out.flatten(1)


def cResNet20_1w1a(
    num_classes: int = 10,
    *,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    forward_type: str = "xnor",
) -> CifarResNetA:
    """ResNet-20 for CIFAR with 1-bit weights and activations (SPEC section 4,
    "cResNet20_1w1a"; the CIFAR-10 ResNet-20 row of the OvSW paper's CIFAR table).

    Structure: full-precision stem ``hardtanh(bn1(conv1(x)))`` (3x3, 3 -> 16); stages
    ``layer1..3`` of 3 :class:`BasicBlockA` each (widths 16/32/64, strides 1/2/2), where
    ``out = hardtanh(bn1(conv1(x)) + shortcut(x)); out = hardtanh(bn2(conv2(out)) + out)``
    with binary 3x3 convs and a parameter-free :class:`PadShortcut` on downsampling; head
    global average pool -> ``bn2`` (BatchNorm1d 64) -> ``linear``. 18 binary convs.

    Args:
        num_classes: output classes (10 for CIFAR-10).
        act_a, act_w, scaling_factor, forward_type: passed to every
            :class:`~ovsw.OvSWConv2d`; the scaling factor is initialised after the
            weight init (``mean_o |W|`` of the initial weight).
    """
    return CifarResNetA(
        (3, 3, 3),
        num_classes,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=scaling_factor,
        forward_type=forward_type,
    )


def cResNet18_1w1a(
    num_classes: int = 10,
    *,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    forward_type: str = "xnor",
) -> CifarResNetB:
    """ResNet-18 for CIFAR with 1-bit weights and activations (SPEC section 4,
    "cResNet18_1w1a"; the CIFAR-10 ResNet-18 row of the OvSW paper's CIFAR table).

    Structure: full-precision stem ``bn1(conv1(x))`` (3x3, 3 -> 64, no activation);
    stages ``layer1..4`` of 2 :class:`BasicBlockB` each (widths 64/128/256/512, strides
    1/2/2/2), where ``out = hardtanh(bn1(conv1(x))); out = hardtanh(bn2(conv2(out)) +
    shortcut(x))`` and the shortcut is a binary 1x1 conv + BatchNorm2d on downsampling;
    head ``avgpool`` -> ``bn2`` (BatchNorm2d 512) -> ``fc`` (1x1 conv with bias) ->
    flatten. 19 binary convs (16 3x3 + 3 shortcut 1x1).

    Args:
        num_classes: output classes (10 for CIFAR-10).
        act_a, act_w, scaling_factor, forward_type: passed to every
            :class:`~ovsw.OvSWConv2d`; the scaling factor is initialised after the
            weight init (``mean_o |W|`` of the initial weight).
    """
    return CifarResNetB(
        (2, 2, 2, 2),
        num_classes,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=scaling_factor,
        forward_type=forward_type,
    )
