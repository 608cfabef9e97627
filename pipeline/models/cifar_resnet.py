"""CIFAR ResNets (He et al., 2016) as used throughout the CIFAR-100 KD literature.

Module names (``conv1``, ``bn1``, ``layer1..3``, ``fc``; blocks ``conv1/bn1/conv2/bn2/downsample``)
match the public CRD / mdistiller teacher checkpoints, so their state dicts load strictly.
Unlike those codebases, ``forward`` returns only the logits ``[B, num_classes]``.

``resnetN`` uses widths 16/32/64 (depth 6n+2); ``resnet8x4`` and ``resnet32x4`` use the 4x wider
stem-and-stage widths 32 / 64/128/256 of the CRD paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CifarResNet",
    "init_cifar_weights_",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet44",
    "resnet56",
    "resnet110",
]


def init_cifar_weights_(
    model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False
) -> None:
    """Initialise ``model`` in place the way the CIFAR KD zoo does, so from-scratch runs are comparable.

    Convolutions get He-normal with fan-out (identical to the zoo's ``normal_(0, sqrt(2 / (k*k*out)))``),
    BatchNorm gets weight 1 / bias 0. Linear layers keep PyTorch's default unless ``linear_std`` is given
    (VGG / MobileNetV2 use N(0, 0.01) with zero bias); ``zero_linear_bias`` zeroes only the bias (WRN).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; ``downsample`` (1x1 conv + BN) when shape changes."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class CifarResNet(nn.Module):
    """3-stage ResNet for 32x32 inputs: stem conv -> layer1 (32x32) -> layer2 (16x16) -> layer3 (8x8) -> fc.

    Args:
        depth: total depth, 6n+2 (n BasicBlocks per stage).
        num_filters: ``[stem, stage1, stage2, stage3]`` widths.
        num_classes: output logits.
    """

    def __init__(self, depth: int, num_filters: list[int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        init_cifar_weights_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            # Named Sequential indices 0/1 are what the public checkpoints store ("downsample.0.weight").
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # Global average pool: equals the zoo's AvgPool2d(8) at 32x32 but also works at other sizes.
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [B, C]
        return self.fc(x)


_NARROW = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _NARROW, num_classes)


def resnet14(num_classes: int) -> CifarResNet:
    return CifarResNet(14, _NARROW, num_classes)


def resnet20(num_classes: int) -> CifarResNet:
    return CifarResNet(20, _NARROW, num_classes)


def resnet32(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _NARROW, num_classes)


def resnet44(num_classes: int) -> CifarResNet:
    return CifarResNet(44, _NARROW, num_classes)


def resnet56(num_classes: int) -> CifarResNet:
    return CifarResNet(56, _NARROW, num_classes)


def resnet110(num_classes: int) -> CifarResNet:
    return CifarResNet(110, _NARROW, num_classes)


def resnet8x4(num_classes: int) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
