"""VGG-Small with 1-bit weights and activations (SPEC section 4).

Module names and registration order reproduce upstream's ``state_dict`` keys exactly.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._utils import apply_scaling_factor, binary_conv, check_num_classes

__all__ = ["VGGSmall", "VGGSmall_1w1a"]


class VGGSmall(nn.Module):
    """VGG-Small for 32x32 inputs: six 3x3 convs (padding 1), the first full precision.

    Forward::

        x = nonlinear0(bn0(conv0(x)))                 # fp 3 -> 128
        x = nonlinear1(bn1(pooling(conv1(x))))        # bin 128 -> 128, 32 -> 16
        x = nonlinear2(bn2(conv2(x)))                 # bin 128 -> 256
        x = nonlinear3(bn3(pooling(conv3(x))))        # bin 256 -> 256, 16 -> 8
        x = nonlinear4(bn4(conv4(x)))                 # bin 256 -> 512
        x = nonlinear5(bn5(pooling(conv5(x))))        # bin 512 -> 512, 8 -> 4; PReLU(512)
        fc(flatten(x))                                # Linear(8192, classes)

    ``nonlinear0..4`` are Hardtanh, ``pooling`` is MaxPool2d(2).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        act_a: str = "binary",
        act_w: str = "ste",
        scaling_factor: bool = False,
        forward_type: str = "xnor",
    ) -> None:
        super().__init__()
        num_classes = check_num_classes(num_classes)
        opts = dict(act_a=act_a, act_w=act_w, forward_type=forward_type)
        self.conv0 = nn.Conv2d(3, 128, kernel_size=3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(128)
        self.nonlinear0 = nn.Hardtanh()
        self.conv1 = binary_conv(128, 128, 3, 1, 1, **opts)
        self.pooling = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bn1 = nn.BatchNorm2d(128)
        self.nonlinear1 = nn.Hardtanh()
        self.conv2 = binary_conv(128, 256, 3, 1, 1, **opts)
        self.bn2 = nn.BatchNorm2d(256)
        self.nonlinear2 = nn.Hardtanh()
        self.conv3 = binary_conv(256, 256, 3, 1, 1, **opts)
        self.bn3 = nn.BatchNorm2d(256)
        self.nonlinear3 = nn.Hardtanh()
        self.conv4 = binary_conv(256, 512, 3, 1, 1, **opts)
        self.bn4 = nn.BatchNorm2d(512)
        self.nonlinear4 = nn.Hardtanh()
        self.conv5 = binary_conv(512, 512, 3, 1, 1, **opts)
        self.bn5 = nn.BatchNorm2d(512)
        self.nonlinear5 = nn.PReLU(512)
        self.fc = nn.Linear(512 * 4 * 4, num_classes)
        self._initialize_weights()
        apply_scaling_factor(self, scaling_factor)

    def _initialize_weights(self) -> None:
        """Upstream's VGG init, over every conv (binary ones included), BN and Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.nonlinear0(self.bn0(self.conv0(x)))
        x = self.nonlinear1(self.bn1(self.pooling(self.conv1(x))))
        x = self.nonlinear2(self.bn2(self.conv2(x)))
        x = self.nonlinear3(self.bn3(self.pooling(self.conv3(x))))
        x = self.nonlinear4(self.bn4(self.conv4(x)))
        x = self.nonlinear5(self.bn5(self.pooling(self.conv5(x))))
        return self.fc(x.flatten(1))


def VGGSmall_1w1a(
    num_classes: int = 10,
    *,
    act_a: str = "binary",
    act_w: str = "ste",
    scaling_factor: bool = False,
    forward_type: str = "xnor",
) -> VGGSmall:
    """VGG-Small for CIFAR with 1-bit weights and activations (SPEC section 4,
    "VGGSmall_1w1a"; the CIFAR-10 VGG-Small row of the OvSW paper's CIFAR table).

    Structure (see :class:`VGGSmall`): fp ``conv0`` 3 -> 128, then binary ``conv1..5``
    (128-128, 128-256, 256-256, 256-512, 512-512; max-pool after conv1, conv3, conv5),
    each followed by BatchNorm2d and Hardtanh (PReLU(512) after the last), then
    ``fc`` = Linear(8192, classes). 5 binary convs. Init (overriding the defaults):
    every conv weight ~ N(0, sqrt(2 / (kh * kw * out_channels))), BatchNorm weight 1 and
    bias 0, Linear weight ~ N(0, 0.01) and bias 0.

    Args:
        num_classes: output classes (10 for CIFAR-10).
        act_a, act_w, scaling_factor, forward_type: passed to every
            :class:`~ovsw.OvSWConv2d`; the scaling factor is initialised after the
            weight init (``mean_o |W|`` of the initial weight).
    """
    return VGGSmall(
        num_classes,
        act_a=act_a,
        act_w=act_w,
        scaling_factor=scaling_factor,
        forward_type=forward_type,
    )
