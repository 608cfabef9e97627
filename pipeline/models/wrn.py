"""Wide ResNets (Zagoruyko & Komodakis, 2016) for 32x32 inputs, as in the CIFAR-100 KD zoo.

Module names (``conv1``, ``block1..3.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``)
match the public CRD / mdistiller checkpoints; ``convShortcut`` keeps its camelCase for that reason.
``forward`` returns only the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.cifar_resnet import init_cifar_weights_

__all__ = ["WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # The reference takes the projection shortcut from the *activated* input but the identity
        # shortcut from the raw input; pretrained teachers depend on exactly this.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage of ``n`` blocks; wrapped in ``.layer`` because the checkpoints say ``block1.layer.0``."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor: stem conv, three stages (16k, 32k, 64k channels), BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (e.g. 16, 40), got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        init_cifar_weights_(self, zero_linear_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # [B, 64k]
        return self.fc(out)


def wrn_16_1(num_classes: int) -> WideResNet:
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int) -> WideResNet:
    return WideResNet(16, 2, num_classes)


def wrn_40_1(num_classes: int) -> WideResNet:
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int) -> WideResNet:
    return WideResNet(40, 2, num_classes)
