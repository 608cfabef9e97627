"""Model registry: one name -> builder table for the CIFAR KD zoo, torchvision ImageNet models and digits.

Names are the ones the KD literature and the public checkpoints use (``resnet32x4``, ``wrn_40_2``,
``MobileNetV2``, ``ShuffleV1``...), so ``teacher.arch`` in params.yaml reads like the papers' tables.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Literal

import torchvision
from torch import nn

from pipeline.augment import Normalization
from pipeline.config import ConfigError
from pipeline.models import cifar_resnet, cifar_resnet_a, digits, mobilenetv2, shufflenet, vgg, wrn

__all__ = [
    "ARCH_ATTR",
    "MODEL_NAMES",
    "build_model",
    "check_arch",
    "classifier_of",
    "count_parameters",
    "input_stats",
    "model_family",
    "model_normalization",
]

Family = Literal["digits", "cifar", "imagenet"]

# CIFAR zoo builders take num_classes only: their stems are hard-wired to RGB like the checkpoints.
_CIFAR: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": cifar_resnet.resnet8,
    "resnet14": cifar_resnet.resnet14,
    "resnet20": cifar_resnet.resnet20,
    "resnet32": cifar_resnet.resnet32,
    "resnet44": cifar_resnet.resnet44,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "resnet8x4": cifar_resnet.resnet8x4,
    "resnet32x4": cifar_resnet.resnet32x4,
    # Option-A (parameter-free shortcut) ResNets of the published CIFAR-10 weights; see cifar_resnet_a.
    "resnet20_a": cifar_resnet_a.resnet20_a,
    "resnet32_a": cifar_resnet_a.resnet32_a,
    "resnet44_a": cifar_resnet_a.resnet44_a,
    "resnet56_a": cifar_resnet_a.resnet56_a,
    "resnet110_a": cifar_resnet_a.resnet110_a,
    "wrn_16_1": wrn.wrn_16_1,
    "wrn_16_2": wrn.wrn_16_2,
    "wrn_40_1": wrn.wrn_40_1,
    "wrn_40_2": wrn.wrn_40_2,
    "vgg8": vgg.vgg8,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "MobileNetV2": mobilenetv2.mobilenetv2,
    "ShuffleV1": shufflenet.shufflenet_v1,
    "ShuffleV2": shufflenet.shufflenet_v2,
}

# Architectures whose weights come with their own input statistics (mean, std); every other model is
# trained here and normalises with its recipe's dataset statistics.
_INPUT_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: cifar_resnet_a.INPUT_STATS for name in ("resnet20_a", "resnet32_a", "resnet44_a", "resnet56_a", "resnet110_a")
}

# torchvision architectures, always built untrained (weights=None): machines are offline, and
# pretrained weights go through checkpoints.torchvision_weights + load_weights so they are verified.
_IMAGENET: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "efficientnet_b0",
    "vit_b_16",
)

_DIGITS: dict[str, Callable[[int, int], nn.Module]] = {
    "digits_cnn": digits.digits_cnn,
    "digits_mlp": digits.digits_mlp,
    "digits_mlp16": digits.digits_mlp16,
}

MODEL_NAMES: tuple[str, ...] = (*_DIGITS, *_CIFAR, *_IMAGENET)

# Final-layer attribute names, in the order they are tried: ours and the zoo's (fc / classifier / linear),
# torchvision's (fc for ResNets, classifier[-1] for MobileNet/EfficientNet, heads.head for ViT).
_HEAD_ATTRS = ("fc", "classifier", "linear", "heads")

# build_model tags each model with its registry name so error messages can say "resnet32", not "CifarResNet".
ARCH_ATTR = "arch_name"


def _unknown_name_text(name: str) -> str:
    lowered = {n.lower(): n for n in MODEL_NAMES}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(lowered[c]) for c in close)}?" if close else ""
    return f"Unknown model name {name!r}.{hint} Valid names: {', '.join(MODEL_NAMES)}"


def _unknown_name_error(name: str) -> ValueError:
    return ValueError(_unknown_name_text(name))


def check_arch(name: str, key: str) -> None:
    """Refuse an architecture the registry cannot build, naming the params.yaml ``key`` (e.g.
    ``student.arch``), before a stage does any expensive work."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"params.yaml {key}: {_unknown_name_text(name)}. Set {key} to one of these.")


def model_family(name: str) -> Family:
    """Input family of ``name``: ``"digits"`` (1x8x8), ``"cifar"`` (3x32x32) or ``"imagenet"`` (3x224x224)."""
    if name in _DIGITS:
        return "digits"
    if name in _CIFAR:
        return "cifar"
    if name in _IMAGENET:
        return "imagenet"
    raise _unknown_name_error(name)


def input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) ``name``'s published weights expect, or None when the model uses its recipe's."""
    model_family(name)  # unknown names raise
    return _INPUT_STATS.get(name)


def model_normalization(name: str, recipe: str) -> Normalization:
    """The input normalisation model ``name`` is fed with under augmentation ``recipe``: its published
    weights' statistics where it has them (the option-A ResNets), else the recipe's dataset statistics."""
    stats = input_stats(name)
    return Normalization.of_recipe(recipe) if stats is None else Normalization(*stats)


def build_model(name: str, *, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build an untrained ``name`` with ``num_classes`` outputs; ``forward(x)`` returns logits [B, C].

    Raises:
        ValueError: unknown ``name`` (lists the valid ones), ``num_classes < 1``, or an ``in_channels``
            the family does not support (CIFAR and ImageNet models are RGB-only).
    """
    model = _build(name, model_family(name), num_classes, in_channels)
    setattr(model, ARCH_ATTR, name)
    return model


def _build(name: str, family: Family, num_classes: int, in_channels: int) -> nn.Module:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 for model {name!r}, got {num_classes}")
    if family == "digits":
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1 for model {name!r}, got {in_channels}")
        return _DIGITS[name](num_classes, in_channels)
    if in_channels != 3:
        raise ValueError(
            f"Model {name!r} ({family} family) takes 3-channel RGB input, got in_channels={in_channels}; "
            "convert the images to RGB or pick a digits model"
        )
    if family == "cifar":
        return _CIFAR[name](num_classes)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` of ``model``; a forward pre-hook on it sees the penultimate features [B, D].

    Works for every model ``build_model`` makes (and unwraps DDP / ``torch.compile`` wrappers).
    """
    for wrapper_attr in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        inner = getattr(model, wrapper_attr, None)
        if isinstance(inner, nn.Module):
            return classifier_of(inner)
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Sequential) and len(head) > 0:
            head = head[-1]
        if isinstance(head, nn.Linear):
            return head
    raise TypeError(
        f"No final Linear found on {type(model).__name__}: looked for attributes {', '.join(_HEAD_ATTRS)} "
        "(a Linear, or a Sequential ending in one)"
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())
