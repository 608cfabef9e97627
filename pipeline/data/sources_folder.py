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
from pipeline.data.shards import BLOCK, MAX_MEMBER_BYTES, check_tar_member
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
    """Image members of an uncompressed ImageFolder tar, each checked before it is used.

    tarfile stops without an error at a corrupt header (bad checksum) or where a tar was cut at a
    member boundary, which would silently drop every later member (whole classes); so the place
    where it stops must be the end-of-archive marker (``_check_tar_end``).
    """
    tree: Tree = {}
    size = path.stat().st_size
    seen: set[str] = set()
    last = None  # the last member read, for messages
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header; keep memory flat at 1M members
                check_tar_member(info, archive_bytes=size, where=str(path))
                if info.offset_data + info.size + -info.size % BLOCK > size:  # padding cut off
                    _truncated(path, size, info.name)
                last = info.name
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
            end = tar.offset
    except tarfile.TarError as exc:
        after = f" after member {last!r}" if last else ""
        raise DataError(f"{path}: not a readable uncompressed tar ({exc}{after}). Compressed "
                        "archives cannot be read by offset: decompress to .tar or extract it; a "
                        "damaged archive must be restored from its source.") from exc
    _check_tar_end(path, end, last)
    return tree


_RESTORE = ("Restore the archive from its source (download or copy it again, or rebuild it with "
            "`tar -cf`) and rerun `aekt prepare`.")


def _after(last: str | None) -> str:
    return f"after member {last!r}" if last else "at the start of the archive"


def _truncated(path: Path, size: int, last: str | None, marker_at: int | None = None) -> None:
    where = f" (two zero blocks, expected at byte {marker_at})" if marker_at is not None else ""
    raise DataError(f"{path}: truncated tar: the archive ends at byte {size}, {_after(last)}, "
                    f"without the end-of-archive marker{where}; it was cut short, and members after "
                    f"that point are lost. {_RESTORE}")


def _check_tar_end(path: Path, end: int, last: str | None) -> None:
    """DataError unless byte ``end`` of ``path`` starts the end-of-archive marker (two zero blocks)
    and only zeros follow it; ``end`` is where tarfile stopped reading headers."""
    zero = bytes(BLOCK)
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(2 * BLOCK)
        if marker == zero * 2:
            while chunk := f.read(1 << 20):
                if chunk.count(0) != len(chunk):
                    raise DataError(
                        f"{path}: data after the end-of-archive marker at byte {end} "
                        f"({_after(last)}): tar readers ignore it, so its members would be "
                        "missing (two archives concatenated with `cat`?). Rebuild one archive "
                        "with `tar -cf` (or append with `tar -A`) and rerun `aekt prepare`.")
            return
    if len(marker) < BLOCK or (marker[:BLOCK] == zero and len(marker) < 2 * BLOCK):
        _truncated(path, end + len(marker), last, marker_at=end)
    if marker[:BLOCK] == zero:
        reason = "a zero block followed by data (a zeroed or overwritten header)"
    else:
        try:
            tarfile.TarInfo.frombuf(marker[:BLOCK], tarfile.ENCODING, "surrogateescape")
            reason = "tarfile cannot read it"
        except tarfile.HeaderError as exc:
            reason = str(exc)
    raise DataError(f"{path}: corrupt tar header at byte {end}, {_after(last)}: {reason}; every "
                    f"member from there on would be missing. {_RESTORE}")


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
            # A split that lacks whole classes is an incomplete copy (a tar cut short, a folder
            # not synced); training on it would report accuracy on the wrong set of classes.
            raise DataError(f"{root}: {len(missing)} of {len(classes)} classes have images in "
                            f"train/ but no {dirs['test']}/ folder: {', '.join(missing[:5])}"
                            f"{', …' if len(missing) > 5 else ''}; the {dirs['test']} split is "
                            "incomplete. Restore the missing images from the dataset's source "
                            "(or remove those classes from train/ too) and rerun `aekt prepare`.")
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
    # Images found per class (before max_per_class), so an unevenly short class is visible.
    found = {s: [len(files) for files in tree[d].values()] for s, d in dirs.items()}
    log.info("%s: %d classes, %s", root, len(classes), ", ".join(
        f"{s} {len(items)} images ({min(found[s])}-{max(found[s])} found per class)"
        for s, items in splits.items()))
    description = describe(cfg, layout=layout, split_dirs=dirs, archives_sha256=archives,
                           train_order=f"sha256('{cfg.split_seed}/' + name)")
    return SourcePlan(classes=classes, channels=3, description=description, splits=splits)
