"""A teacher/student pair for sklearn's 8x8 digits: the CPU-sized end-to-end smoke test of the pipeline.

``digits_cnn`` (teacher, 29k parameters) reaches >=97% test accuracy after a few CPU seconds of
training; ``digits_mlp`` (64-32-10) and ``digits_mlp16`` (64-16-10) are the students it distils into.
Inputs are [B, in_channels, 8, 8]; every model ends in a Linear called ``fc``.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitsCNN", "DigitsMLP", "digits_cnn", "digits_mlp", "digits_mlp16"]

_SIDE = 8  # sklearn digits are 8x8


class DigitsCNN(nn.Module):
    """conv3x3(32)-BN-ReLU -> conv3x3(64)-BN-ReLU -> maxpool 2 -> flatten (64*4*4) -> ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            # Keep the 4x4 layout rather than pooling globally: digit identity lives in where strokes are.
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * (_SIDE // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, in_channels, 8, 8] -> logits [B, num_classes]."""
        return self.fc(self.features(x))


class DigitsMLP(nn.Module):
    """Flatten -> Linear(64*in_channels, hidden) -> ReLU -> ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * _SIDE * _SIDE, hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [B, in_channels, 8, 8] -> logits [B, num_classes]."""
        return self.fc(self.features(x))


def digits_cnn(num_classes: int, in_channels: int = 1) -> DigitsCNN:
    return DigitsCNN(num_classes, in_channels)


def digits_mlp(num_classes: int, in_channels: int = 1) -> DigitsMLP:
    return DigitsMLP(num_classes, in_channels, hidden=32)


def digits_mlp16(num_classes: int, in_channels: int = 1) -> DigitsMLP:
    return DigitsMLP(num_classes, in_channels, hidden=16)
