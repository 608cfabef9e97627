"""VGG with BatchNorm for 32x32 inputs, as in the CIFAR-100 KD zoo (``vgg8`` / ``vgg11`` / ``vgg13``).

Layout and names match the public CRD / mdistiller checkpoints: five conv stages ``block0..4``
(``nn.Sequential`` of conv(bias)-BN-ReLU, the stage's last ReLU omitted so the indices line up),
``pool0..4`` between them, and a single ``classifier`` Linear(512, C). The KD zoo's "vgg13" teacher
is the BN variant, so these all are. ``forward`` returns only the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.cifar_resnet import init_cifar_weights_

__all__ = ["VGG", "vgg8", "vgg11", "vgg13"]

# Per-stage conv widths (torchvision's configuration letters; "S" is the KD zoo's 8-layer variant).
_CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _make_stage(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [
            nn.Conv2d(in_channels, w, kernel_size=3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
        ]
        in_channels = w
    # The stage's final ReLU is applied in forward (the zoo exposes the pre-activation), so drop it here.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv stages with max-pooling after the first three (and the fourth for 64x64 inputs)."""

    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        in_ch = [3] + [stage[-1] for stage in cfg[:-1]]
        self.block0 = _make_stage(cfg[0], in_ch[0])
        self.block1 = _make_stage(cfg[1], in_ch[1])
        self.block2 = _make_stage(cfg[2], in_ch[2])
        self.block3 = _make_stage(cfg[3], in_ch[3])
        self.block4 = _make_stage(cfg[4], in_ch[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_cifar_weights_(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        # The reference pools a 4th time only for 64x64 (Tiny-ImageNet) inputs; at 32x32 block4 runs at 4x4.
        if h == 64:
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        x = torch.flatten(self.pool4(x), 1)  # [B, 512]
        return self.classifier(x)


def vgg8(num_classes: int) -> VGG:
    return VGG(_CFG["S"], num_classes)


def vgg11(num_classes: int) -> VGG:
    return VGG(_CFG["A"], num_classes)


def vgg13(num_classes: int) -> VGG:
    return VGG(_CFG["B"], num_classes)
