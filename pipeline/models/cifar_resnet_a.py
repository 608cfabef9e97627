"""Option-A CIFAR ResNets (He et al., 2016, section 4.2): the variant of the published CIFAR-10 weights.

``akamaster/pytorch_resnet_cifar10`` (the ``resnet20/32/44/56-*.th`` files) builds its ResNets with
**parameter-free shortcuts**: where a block halves the resolution and doubles the width, the input is
subsampled with stride 2 (``x[:, :, ::2, ::2]``) and zero-padded with ``planes // 4`` channels on each
side. The option-B ResNets in :mod:`pipeline.models.cifar_resnet` (1x1 conv + BN shortcut, ``fc`` head)
are what the CIFAR-100 KD zoo uses, so the two families cannot share weights.

Module names (``conv1``, ``bn1``, ``layer1..3.{i}.{conv1,bn1,conv2,bn2}``, ``linear``) are the
checkpoint's, so its state dict (after the ``module.`` prefix is stripped) loads strictly.
These models expect RGB in [0, 1] normalised with the ImageNet mean/std (:data:`INPUT_STATS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.cifar_resnet import init_cifar_weights_

__all__ = [
    "INPUT_STATS",
    "CifarResNetA",
    "resnet20_a",
    "resnet32_a",
    "resnet44_a",
    "resnet56_a",
    "resnet110_a",
    "shortcut_a",
]

# The normalisation the published weights were trained with (ImageNet statistics), (mean, std).
INPUT_STATS: tuple[tuple[float, ...], tuple[float, ...]] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def shortcut_a(x: Tensor, planes: int) -> Tensor:
    """Option-A shortcut: subsample ``x`` [B, C, H, W] by 2 and zero-pad to ``C + 2 * (planes // 4)`` channels."""
    pad = planes // 4
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlockA(nn.Module):
    """Two 3x3 convs with a parameter-free (option-A) shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.planes = planes
        self.reshape = stride != 1 or in_planes != planes

    def forward(self, x: Tensor) -> Tensor:
        residual = shortcut_a(x, self.planes) if self.reshape else x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class CifarResNetA(nn.Module):
    """3-stage option-A ResNet of depth 6n+2 at widths 16/32/64 with a ``linear`` head."""

    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. 20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, n, stride=1)
        self.layer2 = self._make_layer(16, 32, n, stride=2)
        self.layer3 = self._make_layer(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        init_cifar_weights_(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlockA(in_planes, planes, stride)]
        layers += [BasicBlockA(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [B, 64]
        return self.linear(x)


def resnet20_a(num_classes: int) -> CifarResNetA:
    return CifarResNetA(20, num_classes)


def resnet32_a(num_classes: int) -> CifarResNetA:
    return CifarResNetA(32, num_classes)


def resnet44_a(num_classes: int) -> CifarResNetA:
    return CifarResNetA(44, num_classes)


def resnet56_a(num_classes: int) -> CifarResNetA:
    return CifarResNetA(56, num_classes)


def resnet110_a(num_classes: int) -> CifarResNetA:
    return CifarResNetA(110, num_classes)
