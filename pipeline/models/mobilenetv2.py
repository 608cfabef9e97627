"""MobileNetV2 (Sandler et al., 2018) as used for CIFAR-100 KD: expansion 6, width multiplier 0.5.

This is the KD zoo's ``MobileNetV2`` (mdistiller's ``mobile_half``): module names ``conv1``,
``blocks.<stage>.<i>.conv.<0..7>``, ``conv2``, ``classifier.0`` match the public CRD / mdistiller
checkpoints. Note the stride-2 stem: 32x32 inputs end at 2x2 before global pooling, as in the reference.
``forward`` returns only the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.cifar_resnet import init_cifar_weights_

__all__ = ["MobileNetV2", "mobilenetv2"]


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand -> depthwise 3x3 -> pointwise linear projection, residual when shapes agree."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # One flat Sequential (indices 0..7) because the checkpoints store e.g. "conv.3.weight".
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with expansion ``expand_ratio`` and width multiplier ``width_mult``."""

    # (expansion t — None means the model's expand_ratio, channels c, repeats n, first stride s)
    _SETTING: tuple[tuple[int | None, int, int, int], ...] = (
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    )

    def __init__(self, num_classes: int, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_ch, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self._SETTING:
            out_ch = int(c * width_mult)
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(in_ch, out_ch, stride, expand_ratio if t is None else t))
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*stage))
        # The reference never narrows the last layer (1280 channels even at width 0.5).
        last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_ch, last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last_channel, num_classes))
        init_cifar_weights_(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        out = self.conv1(x)
        for stage in self.blocks:
            out = stage(out)
        out = self.conv2(out)
        # Global average pool; the reference's AvgPool2d(2, ceil_mode=True) is the same at 32x32.
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # [B, 1280]
        return self.classifier(out)


def mobilenetv2(num_classes: int) -> MobileNetV2:
    """The KD zoo's ``MobileNetV2`` (expansion 6, width 0.5)."""
    return MobileNetV2(num_classes, expand_ratio=6, width_mult=0.5)
