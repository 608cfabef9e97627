"""What a logit-store folder may hold, so that the store code deletes only what it wrote.

`aekt cache --rebuild` replaces the folder named by ``--store``. A mistyped path (``--store
models``, ``--store cache``, ``--store .``) must never cost the user a file, so a folder counts as a
store only when its ``zarr.json`` carries the attrs `aekt cache` writes (``schema_version`` and
``provenance``; their values may be damaged — that is what a rebuild is for) and everything in it is
something the store code writes: that ``zarr.json``, the codec arrays, ``params``, ``done`` and
``labels``, each holding its own ``zarr.json`` and chunk files named by chunk coordinates under
``c/``, plus the ``*.<uuid>.partial`` temporary files zarr's atomic writes leave behind when killed.

On an object store (``s3://…``) the same rule applies to the keys under the store's prefix; a prefix
whose ``zarr.json`` is absent or has no attrs is what a killed create left (the attrs are written
last there, see ``LogitStore.create``) and may be cleared when every key is a store's. The helpers
at the end (``key_exists``, ``keys_under``, ``bytes_under``) are how the store code sees its files on
either kind of storage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from pipeline.cache.codecs import CODEC_NAMES, make_codec
from pipeline.cache.errors import CacheError
from pipeline.data.location import Location, filesystem, is_object_store

# Any codec's arrays: the store being replaced may have been built with another codec.
STORE_ARRAYS = frozenset({"params", "done", "labels"}.union(*(make_codec(c).fields(2) for c in CODEC_NAMES)))
_PARTIAL = re.compile(r".*\.[0-9a-f]{32}\.partial")  # zarr's _atomic_write temp name
_COORD = re.compile(r"\d+")
_ARRAY_NAMES = "|".join(sorted(STORE_ARRAYS))
_OBJECT_KEY = re.compile(rf"zarr\.json|(?:{_ARRAY_NAMES})/(?:zarr\.json|c(?:/\d+)+)")  # a store's keys
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
        return _attrs_problem(meta.read_bytes())
    except OSError as err:
        return f"its zarr.json cannot be read as JSON ({type(err).__name__})"


def _attrs_problem(raw: bytes, *, bare_ok: bool = False) -> str | None:
    """Why the group metadata ``raw`` is not ours (``bare_ok``: a group without attrs, as zarr writes
    it before the store code adds them, counts as ours)."""
    try:
        doc = json.loads(raw)
    except ValueError as err:  # bad JSON and bad UTF-8
        return f"its zarr.json cannot be read as JSON ({type(err).__name__})"
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if bare_ok and attrs == {}:
        return None
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


def foreign_content(path: Location, *, need_metadata: bool = True, tree: bool = True) -> str | None:
    """Why deleting ``path`` could lose something the store code did not write; None when ``path``
    is absent, an empty folder, or only a store's files.

    ``need_metadata``: require our group ``zarr.json`` (False for our own temporary folders, which a
    kill can leave before it is written). ``tree``: also check every file in it (False: a quick
    check of the path and its metadata, to refuse a mistyped path before any work). On an object
    store every key is checked, and a missing or bare ``zarr.json`` is a killed create's leftover.
    """
    if is_object_store(path):
        return _object_problem(str(path))
    path = Path(path)
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


def _shown(path: Location) -> str:
    """``path`` as the user gave it, with the absolute path where the given one says little."""
    if is_object_store(path):
        return str(path)
    return f"{path} ({os.path.abspath(path)})" if Path(path).name in ("", ".", "..") else str(path)


def refuse_to_replace(path: Location, *, quick: bool = False) -> None:
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


# ---- object stores ---------------------------------------------------------------------------------
def _object_problem(url: str) -> str | None:
    """Why clearing the prefix ``url`` could lose something the store code did not write."""
    keys = keys_under(url)
    if "zarr.json" in keys:
        fs, root = filesystem(url)
        if fs.size(f"{root}/zarr.json") > _MAX_METADATA_BYTES:
            return "its zarr.json is larger than a logit store's"
        problem = _attrs_problem(fs.cat_file(f"{root}/zarr.json"), bare_ok=True)
        if problem:
            return problem
    foreign = sorted(k for k in keys if not _OBJECT_KEY.fullmatch(k))
    return f"it holds '{foreign[0]}', which is not part of a logit store" if foreign else None


def holds_store(path: Location) -> bool:
    """Whether ``path`` holds something to open as a store: locally a non-empty folder; on an object
    store a ``zarr.json`` with attrs (without, it is a killed create's leftover: create again)."""
    if not is_object_store(path):
        return Path(path).exists() and any(Path(path).iterdir())
    fs, root = filesystem(path)
    try:
        doc = json.loads(fs.cat_file(f"{root}/zarr.json"))
    except FileNotFoundError:
        return False
    except ValueError:
        return True  # damaged metadata: opening it reports what is wrong
    return not isinstance(doc, dict) or doc.get("attributes", {}) != {}


def clear_object_store(url: str) -> None:
    """Delete the store (or a killed create's leftovers) under ``url`` before it is created again:
    its ``zarr.json`` first, so from the first deletion on the prefix is no store. Refuses a prefix
    holding anything the store code does not write."""
    refuse_to_replace(url)
    fs, root = filesystem(url)
    keys = keys_under(url)
    if "zarr.json" in keys:
        fs.rm_file(f"{root}/zarr.json")
    rest = [f"{root}/{k}" for k in keys if k != "zarr.json"]
    if rest:
        fs.rm(rest)
    fs.invalidate_cache(root)


def keys_under(loc: Location, prefix: str = "") -> set[str]:
    """Keys (paths relative to the store ``loc``) of every file under ``prefix``: one walk of a local
    folder, or one (paginated) listing of an object store."""
    if not is_object_store(loc):
        top = Path(loc) / prefix
        return {os.path.relpath(os.path.join(root, f), loc) for root, _, files in os.walk(top) for f in files}
    fs, root = filesystem(loc)
    fs.invalidate_cache(root)  # another process may have written since this one last listed
    base = f"{root}/{prefix}".rstrip("/")
    try:
        found = fs.find(base)
    except FileNotFoundError:
        return set()
    return {k[len(root) + 1:] for k in found}


def key_exists(loc: Location, key: str) -> bool:
    """Whether the file ``key`` of the store ``loc`` exists (a stat, or a HEAD request)."""
    if not is_object_store(loc):
        return os.path.isfile(Path(loc) / key)
    fs, root = filesystem(loc)
    fs.invalidate_cache(f"{root}/{key}")
    return fs.isfile(f"{root}/{key}")


def bytes_under(loc: Location, prefix: str) -> int:
    """Bytes stored under ``prefix`` of the store ``loc`` (compressed chunks + metadata)."""
    if not is_object_store(loc):
        return sum(f.stat().st_size for f in (Path(loc) / prefix).rglob("*") if f.is_file())
    fs, root = filesystem(loc)
    fs.invalidate_cache(root)  # fsspec's du trusts listings cached before the last writes
    try:
        found = fs.find(f"{root}/{prefix}", detail=True)
    except FileNotFoundError:
        return 0
    return sum(int(info.get("size") or 0) for info in found.values())
