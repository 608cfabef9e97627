"""What a logit-store folder may hold, so that the store code deletes only what it wrote.

`aekt cache --rebuild` replaces the folder named by ``--store``. A mistyped path (``--store
models``, ``--store cache``, ``--store .``) must never cost the user a file, so a folder counts as a
store only when its ``zarr.json`` carries the attrs `aekt cache` writes (``schema_version`` and
``provenance``; their values may be damaged — that is what a rebuild is for) and everything in it is
something the store code writes: that ``zarr.json``, the codec arrays, ``params``, ``done`` and
``labels``, each holding its own ``zarr.json`` and chunk files named by chunk coordinates under
``c/``, plus the ``*.<uuid>.partial`` temporary files zarr's atomic writes leave behind when killed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.cache.codecs import CODEC_NAMES, make_codec
from pipeline.cache.errors import CacheError

# Any codec's arrays: the store being replaced may have been built with another codec.
STORE_ARRAYS = frozenset({"params", "done", "labels"}.union(*(make_codec(c).fields(2) for c in CODEC_NAMES)))
_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")  # zarr's _atomic_write temp name
_COORD = re.compile(r"\d+")
_MAX_METADATA_BYTES = 1 << 20  # our group zarr.json is a few KB


def _is_metadata(entry: os.DirEntry) -> bool:
    return (entry.name == "zarr.json" or _PARTIAL.fullmatch(entry.name) is not None) and \
        entry.is_file(follow_symlinks=False)


def _metadata_problem(meta: Path) -> str | None:
    """Why ``meta`` is not the group metadata of a store `aekt cache` wrote (None: it is)."""
    if meta.is_symlink() or not meta.is_file():
        return "it has no zarr.json"
    try:
        if meta.stat().st_size > _MAX_METADATA_BYTES:
            return "its zarr.json is larger than a logit store's"
        doc = json.loads(meta.read_bytes())
    except (OSError, ValueError) as err:  # ValueError covers bad JSON and bad UTF-8
        return f"its zarr.json cannot be read as JSON ({type(err).__name__})"
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or not {"schema_version", "provenance"} <= set(attrs):
        return "its zarr.json lacks the schema_version and provenance attrs that `aekt cache` writes"
    return None


def _chunks_problem(chunks: Path, rel: str) -> str | None:
    """The first entry under an array's ``c/`` folder that is not a chunk file or coordinate folder."""
    for root, dirs, files in os.walk(chunks):
        sub = os.path.relpath(root, chunks)
        where = rel if sub == "." else f"{rel}/{sub}"
        for name in dirs:
            if not _COORD.fullmatch(name) or os.path.islink(os.path.join(root, name)):
                return f"it holds '{where}/{name}', which is not part of a logit store"
        for name in files:  # chunk files may be links into a DVC cache: deleting unlinks them only
            if not (_COORD.fullmatch(name) or _PARTIAL.fullmatch(name)):
                return f"it holds '{where}/{name}', which is not part of a logit store"
    return None


def _tree_problem(folder: Path) -> str | None:
    """The first entry under ``folder`` that the store code does not write."""
    with os.scandir(folder) as entries:
        top = sorted(entries, key=lambda e: e.name)
    for entry in top:
        if _is_metadata(entry):
            continue
        if entry.name not in STORE_ARRAYS or not entry.is_dir(follow_symlinks=False):
            return f"it holds '{entry.name}', which is not part of a logit store"
        with os.scandir(entry.path) as entries:
            inner = sorted(entries, key=lambda e: e.name)
        for sub in inner:
            if _is_metadata(sub):
                continue
            if sub.name != "c" or not sub.is_dir(follow_symlinks=False):
                return f"it holds '{entry.name}/{sub.name}', which is not part of a logit store"
            problem = _chunks_problem(Path(sub.path), f"{entry.name}/c")
            if problem:
                return problem
    return None


def foreign_content(path: Path, *, need_metadata: bool = True, tree: bool = True) -> str | None:
    """Why deleting ``path`` could lose something the store code did not write; None when ``path``
    is absent, an empty folder, or only a store's files.

    ``need_metadata``: require our group ``zarr.json`` (False for our own temporary folders, which a
    kill can leave before it is written). ``tree``: also check every file in it (False: a quick
    check of the path and its metadata, to refuse a mistyped path before any work).
    """
    if path.name in ("", ".", ".."):
        return "a store needs a folder name of its own, such as cache/<dataset>-<teacher>.zarr"
    if path.is_symlink():
        return "it is a symbolic link (its target is not a folder `aekt cache` made)"
    if not path.exists():
        return None
    if not path.is_dir():
        return "it is a file, not a folder"
    if not any(path.iterdir()):
        return None  # an empty folder holds nothing to lose
    if need_metadata:
        problem = _metadata_problem(path / "zarr.json")
        if problem:
            return problem
    return _tree_problem(path) if tree else None


def _shown(path: Path) -> str:
    """``path`` as the user gave it, with the absolute path where the given one says little."""
    return f"{path} ({os.path.abspath(path)})" if path.name in ("", ".", "..") else str(path)


def refuse_to_replace(path: Path, *, quick: bool = False) -> None:
    """Raise unless ``path`` is absent, an empty folder, or a logit store `aekt cache` wrote: the only
    things a rebuild may delete (``quick``: check the path and its zarr.json only, not every file)."""
    problem = foreign_content(path, tree=not quick)
    if problem:
        raise CacheError(f"{_shown(path)}: not a logit store written by `aekt cache` ({problem}), so "
                         "`aekt cache` will not delete or replace it and left it as it is. Pass the "
                         "store's own path with --store (e.g. cache/<dataset>-<teacher>.zarr); if this "
                         "folder is an old store you no longer need, delete it yourself and rerun "
                         "`aekt cache`.")


def remove_leftover(path: Path) -> None:
    """Delete a temporary folder a killed `create` left (``.X.tmp-create``, ``.X.tmp-old``) — only
    when it holds nothing but a store's files."""
    if not (path.exists() or path.is_symlink()):
        return
    problem = foreign_content(path, need_metadata=False)
    if problem:
        raise CacheError(f"{path}: `aekt cache` builds the store here, but this is not a folder it left "
                         f"({problem}); move it away (it is not deleted) and rerun `aekt cache`.")
    shutil.rmtree(path)
