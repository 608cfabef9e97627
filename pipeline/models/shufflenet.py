"""ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) for 32x32 inputs, as in the KD zoo.

``ShuffleV1`` (groups 3, widths 240/480/960) and ``ShuffleV2`` (net size 1: 116/232/464, 1024 head)
keep the module names of the public CRD / mdistiller checkpoints (``conv1``, ``bn1``, ``layer1..3``,
``conv2``/``bn2`` for V2, ``linear``). Both use a 1x1 stride-1 stem, so 32x32 inputs reach 4x4 after
the three stride-2 stages. ``forward`` returns only the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ShuffleNetV1", "ShuffleNetV2", "shufflenet_v1", "shufflenet_v2"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """[B, C, H, W] -> [B, g, C/g, H, W] -> swap g and C/g -> [B, C, H, W], so groups exchange information."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _conv(in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; add the input (stride 1) or concatenate
    its 3x3 average pool (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        # The first unit sees the 24-channel stem, too few to split into groups (as in the paper).
        self.g1 = 1 if in_planes == 24 else groups
        self.conv1 = _conv(in_planes, mid, groups=self.g1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = _conv(mid, mid, 3, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv(mid, out_planes, groups=groups)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1: 1x1 stem (24 ch), three stages whose first unit halves the resolution, ``linear``."""

    def __init__(
        self,
        out_planes: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        stages = []
        for planes, n in zip(out_planes, num_blocks, strict=True):
            # The stride-2 unit concatenates its input, so its branch only produces planes - in_planes.
            units = [ShuffleV1Unit(in_planes, planes - in_planes, 2, groups)]
            units += [ShuffleV1Unit(planes, planes, 1, groups) for _ in range(1, n)]
            stages.append(nn.Sequential(*units))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # [B, 960]
        return self.linear(out)


class ShuffleV2Unit(nn.Module):
    """Stride-1 unit: split channels in half, transform one half (1x1, dw 3x3, 1x1), concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = _conv(half, half)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _conv(half, half, 3, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv(half, half)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Stride-2 unit: two branches on the full input (dw-1x1 and 1x1-dw-1x1), concatenated and shuffled."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        self.conv1 = _conv(in_ch, in_ch, 3, 2, groups=in_ch)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = _conv(in_ch, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _conv(in_ch, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, 2, groups=mid)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2: 1x1 stem (24 ch), three stages (down unit + n units), 1x1 ``conv2`` head, ``linear``."""

    def __init__(
        self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        stages = []
        for ch, n in zip(out_channels[:3], num_blocks, strict=True):
            stages.append(nn.Sequential(ShuffleV2DownUnit(in_ch, ch), *[ShuffleV2Unit(ch) for _ in range(n)]))
            in_ch = ch
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, 3, H, W] -> logits [B, num_classes]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # [B, 1024]
        return self.linear(out)


def shufflenet_v1(num_classes: int) -> ShuffleNetV1:
    """The KD zoo's ``ShuffleV1``: groups 3, stage widths 240/480/960, 4/8/4 units."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


def shufflenet_v2(num_classes: int) -> ShuffleNetV2:
    """The KD zoo's ``ShuffleV2`` (net size 1): widths 116/232/464, 1024-channel head, 3/7/3 units."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes)
