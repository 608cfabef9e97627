"""ImageFolder trees (``<root>/{train,val|test}/<class>/...``), as a directory or an uncompressed
.tar read in place: member headers are scanned once, then each image is read by offset, so a
multi-GB archive is never extracted. Tar members get the same checks as shard members.

The train split is written in a seeded, class-mixed order (``mixed_order``): the stream shuffles
shard order and samples within a shard, so shards cut from a class-sorted listing would give
single-class batches (CIFAR-10: every 1000-sample shard one class) and SGD would not learn.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.samples import DataError, FileRef, RawItem, sha256_file
from pipeline.data.shards import MAX_MEMBER_BYTES, check_tar_member
from pipeline.data.sources import SourcePlan, describe, take_per_class

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (compared lower-case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Test-split directory names in order of preference (ImageNet ships val/ with labels and an
# unlabelled test/, so val wins when both exist).
TEST_DIRS = ("val", "test")
# Hash the source archive for the manifest only when that is cheap (seconds, not minutes).
HASH_LIMIT_BYTES = 1 << 30

# tree[split_dir][class] -> [(relative name inside the class folder, where its bytes are)]
Tree = dict[str, dict[str, list[tuple[str, FileRef]]]]


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMG_EXTENSIONS)


def _is_folder(path: Path) -> bool:
    # Hidden folders (.ipynb_checkpoints, .DS_Store dirs) are never classes or splits.
    return path.is_dir() and not path.name.startswith(".")


def scan_dir(root: Path) -> Tree:
    """Image files under ``root/<split>/<class>/`` (recursively, not following dir symlinks)."""
    tree: Tree = {}
    for split_dir in sorted(p for p in root.iterdir() if _is_folder(p)):
        classes = tree.setdefault(split_dir.name, {})
        for class_dir in sorted(p for p in split_dir.iterdir() if _is_folder(p)):
            files = classes.setdefault(class_dir.name, [])
            for dirpath, dirnames, filenames in os.walk(class_dir):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fname in filenames:
                    path = Path(dirpath) / fname
                    rel = path.relative_to(class_dir).as_posix()
                    if not _is_image(rel):
                        continue
                    try:
                        size = path.stat().st_size
                    except OSError as exc:  # e.g. a dangling symlink
                        raise DataError(f"{path}: cannot read source image: {exc}") from exc
                    if size > MAX_MEMBER_BYTES:
                        raise DataError(f"{path}: {size} bytes is above the {MAX_MEMBER_BYTES}-"
                                        "byte limit for one image.")
                    files.append((rel, FileRef(str(path))))
    return tree


def scan_tar(path: Path) -> Tree:
    """Image members of an uncompressed ImageFolder tar, each checked before it is used."""
    tree: Tree = {}
    size = path.stat().st_size
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header; keep memory flat at 1M members
                check_tar_member(info, archive_bytes=size, where=str(path))
                name = info.name
                while name.startswith("./"):
                    name = name[2:]
                if name in seen:
                    raise DataError(f"{path}: duplicate tar member {name!r}.")
                seen.add(name)
                parts = name.split("/")
                if parts[0].startswith(".") or len(parts) < 2 or parts[1].startswith("."):
                    continue
                if len(parts) >= 3 or info.isdir():
                    files = tree.setdefault(parts[0], {}).setdefault(parts[1], [])
                    if info.isfile() and len(parts) >= 3 and _is_image(name):
                        rel = "/".join(parts[2:])
                        files.append((rel, FileRef(str(path), info.offset_data, info.size)))
    except tarfile.TarError as exc:
        raise DataError(f"{path}: not a readable uncompressed tar ({exc}). Compressed archives "
                        "cannot be read by offset: decompress to .tar or extract it.") from exc
    return tree


def _split_dirs(tree: Tree, root: Path) -> dict[str, str]:
    """Manifest split name -> directory name in the tree."""
    dirs = {}
    if "train" in tree:
        dirs["train"] = "train"
    test_dir = next((d for d in TEST_DIRS if d in tree), None)
    if test_dir:
        dirs["test"] = test_dir
        ignored = [d for d in TEST_DIRS if d in tree and d != test_dir]
        if ignored:
            log.warning("%s: using %s/ as the test split; ignoring %s/", root, test_dir, ignored[0])
    if not dirs:
        found = ", ".join(sorted(tree)) or "nothing"
        raise DataError(f"{root}: no train/, val/ or test/ folder found (found: {found}). Expected "
                        "an ImageFolder tree <root>/{train,val|test}/<class>/<image>; set "
                        "params.yaml data.root to it.")
    for split in ("train", "test"):
        if split not in dirs:
            log.warning("%s: no %s split; the manifest will have only %s", root, split,
                        ", ".join(dirs))
    return dirs


def _class_names(tree: Tree, dirs: dict[str, str], root: Path) -> tuple[str, ...]:
    """Sorted class folders of train (labels are defined by train), else of the test split."""
    for d in dirs.values():
        for cls, files in tree[d].items():
            if not files:
                raise DataError(f"{root}: class folder {d}/{cls}/ holds no images (extensions: "
                                f"{', '.join(IMG_EXTENSIONS)}). Remove it or add its images.")
    labels_from = dirs.get("train", dirs.get("test"))
    classes = tuple(sorted(tree[labels_from]))
    if not classes:
        raise DataError(f"{root}: no class folders under {labels_from}/; expected "
                        f"{labels_from}/<class>/<image>.")
    if "train" in dirs and "test" in dirs:
        extra = sorted(set(tree[dirs["test"]]) - set(classes))
        if extra:
            raise DataError(f"{root}: {dirs['test']}/ has classes missing from train/: "
                            f"{', '.join(extra[:5])}; labels are defined by train/.")
        missing = sorted(set(classes) - set(tree[dirs["test"]]))
        if missing:
            log.warning("%s: %d classes have no %s/ images, e.g. %s", root, len(missing),
                        dirs["test"], missing[0])
    return classes


def _load_tree(root: Path) -> tuple[Tree, str, dict[str, str | None]]:
    """(tree, layout, archive sha256s) for a directory, a .tar, or a directory of .tar files.

    The last form (e.g. ``cifar10-images/{train,test}.tar``) merges the trees of every .tar in
    ``root`` when ``root`` itself has no split folders.
    """
    def digest(path: Path) -> str | None:
        return sha256_file(path) if path.stat().st_size <= HASH_LIMIT_BYTES else None

    if root.is_file():
        return scan_tar(root), "tar", {root.name: digest(root)}
    tree = scan_dir(root)
    archives = sorted(p for p in root.glob("*.tar") if p.is_file())
    if any(d in tree for d in ("train", *TEST_DIRS)) or not archives:
        return tree, "dir", {}
    merged: Tree = {}
    for archive in archives:
        for split_dir, classes in scan_tar(archive).items():
            if split_dir in merged:
                raise DataError(f"{root}: split folder {split_dir}/ appears in several archives "
                                f"(again in {archive.name}); keep one archive per split.")
            merged[split_dir] = classes
    return merged, "tars", {a.name: digest(a) for a in archives}


def mixed_order(items: list[RawItem], seed: int) -> list[RawItem]:
    """``items`` sorted by sha256 of "seed/source name": a class-mixed order that depends only on
    the file names and the seed (not on numpy's generator, the platform or the listing order)."""
    return sorted(items, key=lambda item: hashlib.sha256(f"{seed}/{item.name}".encode()).digest())


def folder_source(cfg: DataConfig) -> SourcePlan:
    """ImageFolder tree at ``cfg.root``; labels = index in the sorted class folder names."""
    assert cfg.root is not None  # DataConfig.validate requires it for folder sources
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"{cfg.source}: data.root {root} does not exist. Set params.yaml "
                        "data.root to an ImageFolder directory (<root>/train/<class>/...), a "
                        ".tar of one, or a directory of such .tar files.")
    tree, layout, archives = _load_tree(root)
    dirs = _split_dirs(tree, root)
    classes = _class_names(tree, dirs, root)
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, d in dirs.items():
        items = []
        for cls in sorted(tree[d], key=label_of.__getitem__):
            for rel, ref in sorted(tree[d][cls], key=lambda e: e[0]):
                items.append(RawItem(label=label_of[cls], name=f"{d}/{cls}/{rel}", payload=ref))
        kept = take_per_class(items, cfg.max_per_class)  # the first N per class, as numbered
        splits[split] = mixed_order(kept, cfg.split_seed) if split == "train" else kept
    log.info("%s: %d classes, %s", root, len(classes),
             ", ".join(f"{s} {len(items)} images" for s, items in splits.items()))
    description = describe(cfg, layout=layout, split_dirs=dirs, archives_sha256=archives,
                           train_order=f"sha256('{cfg.split_seed}/' + name)")
    return SourcePlan(classes=classes, channels=3, description=description, splits=splits)
