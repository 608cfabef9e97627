"""Dataset sources: turn a ``DataConfig`` into per-split lists of raw items in stable order.

A source only lists samples (labels, names, and where the pixels are); ``prepare`` verifies,
encodes and shards them. Stable order: split order for digits, file order for CIFAR pickles,
(class, file name) for ImageFolder trees. ``max_per_class`` keeps the first N items of each
class per split in that order, before verification (a skipped corrupt image is not replaced).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.samples import DataError, RawItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourcePlan:
    """What a source yields: class names, channel count, a manifest description, the items."""

    classes: tuple[str, ...]
    channels: int
    description: dict[str, Any]  # the manifest's "source" (JSON-able)
    splits: dict[str, list[RawItem]]


def take_per_class(items: Iterable[RawItem], max_per_class: int | None) -> list[RawItem]:
    """The first ``max_per_class`` items of each label, keeping the input order."""
    if max_per_class is None:
        return list(items)
    seen: dict[int, int] = {}
    kept = []
    for item in items:
        if seen.get(item.label, 0) < max_per_class:
            seen[item.label] = seen.get(item.label, 0) + 1
            kept.append(item)
    return kept


def describe(cfg: DataConfig, **extra: Any) -> dict[str, Any]:
    """Manifest ``source`` entry: the config fields that change the shards' content, plus extra."""
    return {"type": cfg.source, "root": cfg.root, "max_per_class": cfg.max_per_class,
            "on_corrupt": cfg.on_corrupt, **extra}


def digits_to_pixels(images: np.ndarray) -> np.ndarray:
    """sklearn digits (values 0..16) to uint8 grey levels round(v * 255 / 16), half up."""
    return np.floor(images * 255.0 / 16.0 + 0.5).astype(np.uint8)


def digits_source(cfg: DataConfig) -> SourcePlan:
    """scikit-learn's bundled 8x8 digits with a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    pixels = digits_to_pixels(digits.images)  # [N, 8, 8]
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.test_fraction, stratify=labels,
        random_state=cfg.split_seed, shuffle=True)
    splits = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        items = (RawItem(label=int(labels[i]), name=f"digits[{i}]", payload=pixels[i]) for i in idx)
        splits[split] = take_per_class(items, cfg.max_per_class)
    return SourcePlan(
        classes=tuple(str(d) for d in range(10)), channels=1,
        description=describe(cfg, test_fraction=cfg.test_fraction, split_seed=cfg.split_seed),
        splits=splits)


def open_source(cfg: DataConfig) -> SourcePlan:
    """The SourcePlan for ``cfg.source``; DataError when its files are missing or malformed."""
    if cfg.source == "digits":
        return digits_source(cfg)
    if cfg.source in ("cifar10", "cifar100"):
        from pipeline.data.sources_cifar import cifar_source
        return cifar_source(cfg)
    if cfg.source in ("folder", "imagenet"):
        from pipeline.data.sources_folder import folder_source
        return folder_source(cfg)
    raise DataError(f"params.yaml data.source: unknown source {cfg.source!r}.")
