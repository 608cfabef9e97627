"""CIFAR-10/100 from the official python-pickle release, read with the restricted unpickler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.safe_pickle import load_cifar_pickle
from pipeline.data.samples import DataError, RawItem, sha256_file
from pipeline.data.sources import SourcePlan, describe, take_per_class

log = logging.getLogger(__name__)

# Where data.download puts the release when data.root is not set (relative to the working
# directory, i.e. the repository root for `aekt prepare` / `dvc repro`).
DEFAULT_DOWNLOAD_ROOT = Path("data") / "raw"
_SIDE = 32
_ROW_BYTES = 3 * _SIDE * _SIDE


@dataclass(frozen=True)
class CifarLayout:
    dirname: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), "batches.meta", "labels", "label_names", 10, "CIFAR10"),
    "cifar100": CifarLayout("cifar-100-python", ("train",), ("test",), "meta", "fine_labels",
                            "fine_label_names", 100, "CIFAR100"),
}


def _download(layout: CifarLayout, root: Path) -> None:
    """Fetch and md5-check the official release with torchvision (only the download is used)."""
    import torchvision.datasets  # imported here: heavy, and only this path needs it

    parent = root.parent if root.name == layout.dirname else root
    log.info("downloading %s into %s (torchvision)", layout.dirname, parent)
    dataset_cls = getattr(torchvision.datasets, layout.torchvision_class)
    try:
        dataset_cls(root=str(parent), train=True, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"downloading {layout.dirname} into {parent} failed: {exc}. Download the "
                        "official python release by hand and set params.yaml data.root.") from exc


def find_cifar_dir(cfg: DataConfig) -> Path:
    """The release directory: ``cfg.root`` itself or ``cfg.root/<release dir>``."""
    layout = LAYOUTS[cfg.source]
    root = Path(cfg.root) if cfg.root else DEFAULT_DOWNLOAD_ROOT
    if cfg.download:
        _download(layout, root)
    for candidate in (root, root / layout.dirname):
        if all((candidate / f).is_file() for f in layout.files):
            return candidate
    missing = [f for f in layout.files if not (root / layout.dirname / f).is_file()]
    raise DataError(
        f"{cfg.source}: no official python release at {root} (checked {root} and "
        f"{root / layout.dirname}; missing {', '.join(missing)}). Set params.yaml data.root to "
        f"the {layout.dirname} directory or its parent, or set data.download: true.")


def _class_names(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    meta = load_cifar_pickle(path)
    names = meta.get(layout.names_key)
    if not (isinstance(names, list) and len(names) == layout.num_classes
            and all(isinstance(n, str) for n in names)):
        raise DataError(f"{path}: expected '{layout.names_key}' with {layout.num_classes} class "
                        f"names (official CIFAR meta), got {type(names).__name__}.")
    return tuple(names)


def load_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, list[int]]:
    """uint8 pixels [N, 32, 32, 3] and labels of one official batch file, validated."""
    batch = load_cifar_pickle(path)
    missing = [k for k in ("data", layout.label_key) if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}; found "
                        f"{', '.join(sorted(map(str, batch)))}. Is this the official "
                        f"{layout.dirname} release?")
    data, labels = batch["data"], batch[layout.label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == _ROW_BYTES):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' must be a uint8 array [N, {_ROW_BYTES}], got "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}.")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(v, int) and 0 <= v < layout.num_classes for v in labels)):
        raise DataError(f"{path}: '{layout.label_key}' must be {len(data)} integers in "
                        f"[0, {layout.num_classes}).")
    # Rows are channel-planar (R plane, G plane, B plane); PNG wants [H, W, 3].
    pixels = np.ascontiguousarray(data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))
    return pixels, labels


def cifar_source(cfg: DataConfig) -> SourcePlan:
    layout = LAYOUTS[cfg.source]
    release = find_cifar_dir(cfg)
    classes = _class_names(release / layout.meta, layout)
    splits = {}
    for split, files in (("train", layout.train), ("test", layout.test)):
        items = []
        for file in files:
            pixels, labels = load_batch(release / file, layout)
            items += [RawItem(label=lab, name=f"{file}[{row}]", payload=pixels[row])
                      for row, lab in enumerate(labels)]
        splits[split] = take_per_class(items, cfg.max_per_class)
    hashes = {f: sha256_file(release / f) for f in layout.files}
    return SourcePlan(classes=classes, channels=3,
                      description=describe(cfg, download=cfg.download, files_sha256=hashes),
                      splits=splits)
