"""ImageNet ResNet-18/34 with 1-bit weights and activations (SPEC section 4).

Stem, downsample convs and the head stay full precision; every 3x3 conv inside the
residual stages is an :class:`~ovsw.OvSWConv2d`. Module names and registration order
reproduce upstream's ``state_dict`` keys exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._utils import apply_scaling_factor, binary_conv, check_num_classes

__all__ = ["BasicBlock", "ResNet", "ResNet18_1w1a", "ResNet34_1w1a"]


class BasicBlock(nn.Module):
    """Basic block with a shortcut around each binary conv::

        residual = downsample(x) if downsample is not None else x
        out = hardtanh(bn1(conv1(x)) + residual)
        out = hardtanh(bn2(conv2(out)) + out)

    ``downsample`` is ``Sequential(fp 1x1 conv (stride, no bias), BatchNorm2d)``.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        **conv_options,
    ) -> None:
        super().__init__()
        self.conv1 = binary_conv(inplanes, planes, 3, stride, 1, **conv_options)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.Hardtanh()
        self.conv2 = binary_conv(planes, planes, 3, 1, 1, **conv_options)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.Hardtanh()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)) + residual)
        out = self.act2(self.bn2(self.conv2(out)) + out)
        return out


class ResNet(nn.Module):
    """ImageNet ResNet with :class:`BasicBlock` blocks.

    Forward: fp stem ``maxpool(hardtanh(bn1(conv1(x))))`` (7x7/2 pad 3, 3 -> 64; max
    pool 3/2 pad 1), stages ``layer1..4`` (widths 64/128/256/512, strides 1/2/2/2),
    ``avgpool`` (AdaptiveAvgPool2d(1)), flatten, ``bn2`` (BatchNorm1d 512), ``fc``.
    Init: every BatchNorm2d weight 1e-8 and bias 0; binary convs kaiming normal
    (fan_in, leaky_relu); the other layers keep PyTorch's default init.
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        if len(layers) != 4:
            raise ValueError(f"ResNet has 4 stages, got layers={list(layers)}")
        conv_options = dict(act_a=act_a, act_w=act_w, forward_type=forward_type)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = nn.Hardtanh()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1, conv_options)
        self.layer2 = self._make_layer(128, layers[1], 2, conv_options)
        self.layer3 = self._make_layer(256, layers[2], 2, conv_options)
        self.layer4 = self._make_layer(512, layers[3], 2, conv_options)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bn2 = nn.BatchNorm1d(512 * BasicBlock.expansion)
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1e-8)
                nn.init.zeros_(m.bias)
        apply_scaling_factor(self, scaling_factor)

    def _make_layer(
        self, planes: int, blocks: int, stride: int, conv_options: dict
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * BasicBlock.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, **conv_options)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, **conv_options))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x).flatten(1)
        x = self.bn2(x)
        return self.fc(x)


def ResNet18_1w1a(
    num_classes: int = 1000,
    *,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    forward_type: str = "xnor",
) -> ResNet:
    """ResNet-18 for ImageNet with 1-bit weights and activations (SPEC section 4,
    "ResNet18_1w1a"; the ImageNet ResNet-18 row of the OvSW paper's ImageNet table,
    61.6% top-1 published).

    Structure (see :class:`ResNet`): fp stem 7x7/2 conv, BN, Hardtanh, 3/2 max pool;
    stages of [2, 2, 2, 2] :class:`BasicBlock` (binary 3x3 convs, a shortcut around
    each, fp 1x1 downsample); head avgpool, flatten, BatchNorm1d(512), Linear.
    16 binary convs. Every BatchNorm2d starts with weight 1e-8, bias 0.

    Args:
        num_classes: output classes (1000 for ImageNet).
        act_a, act_w, scaling_factor, forward_type: passed to every
            :class:`~ovsw.OvSWConv2d`; the scaling factor is initialised after the
            weight init (``mean_o |W|`` of the initial weight).
    """
    return ResNet(
        (2, 2, 2, 2),
        num_classes,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=scaling_factor,
        forward_type=forward_type,
    )


def ResNet34_1w1a(
    num_classes: int = 1000,
    *,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    forward_type: str = "xnor",
) -> ResNet:
    """ResNet-34 for ImageNet with 1-bit weights and activations (SPEC section 4,
    "ResNet34_1w1a"; the ImageNet ResNet-34 row of the OvSW paper's ImageNet table,
    65.5% top-1 published).

    Structure (see :class:`ResNet`): as :func:`ResNet18_1w1a` with [3, 4, 6, 3] blocks.
    32 binary convs. Every BatchNorm2d starts with weight 1e-8, bias 0.

    Args:
        num_classes: output classes (1000 for ImageNet).
        act_a, act_w, scaling_factor, forward_type: passed to every
            :class:`~ovsw.OvSWConv2d`; the scaling factor is initialised after the
            weight init (``mean_o |W|`` of the initial weight).
    """
    return ResNet(
        (3, 4, 6, 3),
        num_classes,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=scaling_factor,
        forward_type=forward_type,
    )
