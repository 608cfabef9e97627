"""Prepare stage: source -> verified/encoded samples -> WebDataset shards + manifest.

Workers (``cfg.workers`` processes) do the per-image work (PNG encoding of pixel rows, one full
decode of every source file); the parent assigns indices in stable order and writes the shards,
so the output does not depend on the worker count. Rerunning with the same inputs gives
byte-identical shards and manifest (an unchanged shard file is not rewritten).

Nothing under a final name changes until everything is written: new shards go to a private
staging folder ``<shards_dir>/.prepare-<pid>/`` and the manifest to a temporary name beside it,
then all are renamed into place. A failure (disk full, a corrupt image, Ctrl-C) removes only what
this run wrote and leaves the previous shards and manifest as they were.

``shards_dir`` may be an object-store URL (``s3://bucket/shards/digits``): there is no rename there,
so each shard is written under its final name in one request (readers see the old object or the new
one, never part of one) and the manifest, always a local file, is still written last. A failed run
can then leave new shards beside the previous manifest: readers refuse them by their sha256 until
`aekt prepare` is rerun.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.images import decode_array, encode_npy, encode_png, npy_shape, verify_for_storage
from pipeline.data.location import Location, delete_object, is_object_store, is_url, join, list_names, write_object
from pipeline.data.manifest import Manifest, ShardInfo, SplitInfo
from pipeline.data.samples import DataError, ImageDecodeError, RawItem, Sample, make_key
from pipeline.data.shards import shard_bytes, shard_name
from pipeline.data.sources import SourcePlan, open_source
from pipeline.progress import Progress

log = logging.getLogger(__name__)

_OUR_SHARD = re.compile(r"(?:train|test)-\d{5}\.tar|\.(?:train|test)-\d{5}\.tar\.tmp-\d+")
_STAGING = re.compile(r"\.prepare-(\d+)")
# A full disk, in any of its guises: ENOSPC, a file-size limit (`ulimit -f`: EFBIG), a quota.
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_UNCHANGED = "the existing shards and manifest are unchanged"


def encode_item(item: RawItem, *, channels: int, raw: bool = False) -> tuple[bytes, str] | str:
    """(bytes to store, ext) for one item, or the decode error message for a corrupt image.

    Pixel rows are ours to encode, so they need no verification; source files are decoded once.
    With ``raw`` (data.format: raw) the decoded pixels are stored as ``.npy``: for JPEG sources
    they are exactly the pixels an encoded shard would decode to at training time.
    Runs in worker processes: returns the error instead of raising so the parent applies
    ``on_corrupt`` in stable order.
    """
    if isinstance(item.payload, np.ndarray):
        return (encode_npy(item.payload), "npy") if raw else (encode_png(item.payload), "png")
    try:
        data = item.payload.read()
        if raw:
            return encode_npy(decode_array(data, channels=channels, name=item.name)), "npy"
        return verify_for_storage(data, channels=channels, name=item.name)
    except ImageDecodeError as exc:
        return str(exc)


def _encoded(items: list[RawItem], channels: int, pool: multiprocessing.pool.Pool | None,
             workers: int, raw: bool) -> Iterator[tuple[bytes, str] | str]:
    encode = functools.partial(encode_item, channels=channels, raw=raw)
    if pool is None:
        return map(encode, items)
    # Chunks amortise the IPC round trip (~100 us) over many ~50 us PNG encodes.
    chunksize = max(1, min(256, len(items) // (workers * 8)))
    return pool.imap(encode, items, chunksize=chunksize)


def write_new(path: Path, data: bytes, *, shown: Path) -> None:
    """Write ``data`` to the new file ``path``; an OS error is reported for ``shown``, the final
    name the file is written for (``path`` is a staging name the user never sees)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise DataError(f"{shown}: cannot write it: {exc.strerror} [errno {exc.errno}]; the "
                            "disk is full (or a file-size limit or disk quota was reached). Free "
                            "space (or raise the limit) and rerun `aekt prepare`; "
                            f"{_UNCHANGED}.") from exc
        raise OSError(exc.errno, exc.strerror, str(shown)) from exc


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file holding exactly ``data`` (then it is not rewritten)."""
    try:
        if not os.path.isfile(path) or path.stat().st_size != len(data):
            return False
        with open(path, "rb") as f:
            view, pos = memoryview(data), 0
            while chunk := f.read(1 << 20):
                if view[pos:pos + len(chunk)] != chunk:
                    return False
                pos += len(chunk)
        return pos == len(data)
    except OSError:
        return False


def put_shard(url: Location, data: bytes) -> None:
    """Write one shard object at ``url`` in a single request."""
    try:
        write_object(url, data)
    except OSError as exc:
        raise DataError(f"{url}: cannot write this shard: {exc}. Check that the bucket exists and that the "
                        "credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                        "AWS_ENDPOINT_URL) may write there, then rerun `aekt prepare`; the manifest is "
                        "unchanged.") from exc


def _write_split(split: str, items: list[RawItem], *, cfg: DataConfig, channels: int,
                 shards_dir: Location, staging: Path | None, pool: multiprocessing.pool.Pool | None,
                 progress: bool, exts: set[str], shapes: set[tuple[int, ...]]) -> SplitInfo:
    shards: list[ShardInfo] = []
    skipped: list[str] = []
    buffer: list[Sample] = []

    def flush() -> None:
        name = shard_name(split, len(shards))
        data = shard_bytes(buffer, where=name)
        if staging is None:  # an object store: no staging folder, no rename
            put_shard(join(shards_dir, name), data)
        elif not _same_bytes(shards_dir / name, data):
            write_new(staging / name, data, shown=shards_dir / name)
        shards.append(ShardInfo(name=name, count=len(buffer), start=buffer[0].index,
                                end=buffer[-1].index + 1, sha256=hashlib.sha256(data).hexdigest()))
        buffer.clear()

    started = time.perf_counter()
    results = Progress(len(items), f"prepare {cfg.name}/{split}", "img", bar=progress, logger=log).wrap(
        _encoded(items, channels, pool, cfg.workers, cfg.format == "raw"))
    index = 0
    for item, result in zip(items, results, strict=True):
        if isinstance(result, str):
            if cfg.on_corrupt == "fail":
                raise ImageDecodeError(f"{result} Fix or remove the file, or set params.yaml "
                                       "data.on_corrupt: skip to leave such images out.")
            log.warning("skipping corrupt image: %s", result)
            skipped.append(item.name)
            continue
        data, ext = result
        exts.add(ext)
        if ext == "npy":
            _check_raw_shape(shapes, npy_shape(data, name=item.name), item.name)
        buffer.append(Sample(key=make_key(split, index), index=index, label=item.label,
                             image=data, ext=ext))
        index += 1
        if len(buffer) == cfg.shard_size:
            flush()
    if buffer:
        flush()
    if index == 0:
        raise DataError(f"{cfg.name}/{split}: no usable images ({len(skipped)} skipped as "
                        "corrupt); check params.yaml data.root and data.max_per_class.")
    elapsed = time.perf_counter() - started
    log.info("%s/%s: %d samples in %d shards (%d skipped), %.0f images/s", cfg.name, split,
             index, len(shards), len(skipped), len(items) / max(elapsed, 1e-9))
    return SplitInfo(num_samples=index, shards=tuple(shards), skipped=tuple(skipped))


def _check_raw_shape(shapes: set[tuple[int, ...]], shape: tuple[int, ...], name: str) -> None:
    """data.format: raw stores one image size per dataset (the manifest's image_shape)."""
    if shapes and shape not in shapes:
        first = next(iter(shapes))
        raise DataError(f"{name}: image is {shape[0]}x{shape[1]} (x{shape[2]} channels) but earlier images "
                        f"are {first[0]}x{first[1]} (x{first[2]}); params.yaml data.format: raw needs one "
                        "image size per dataset. Use data.format: encoded for images of mixed sizes "
                        f"(ImageNet); {_UNCHANGED}.")
    shapes.add(shape)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a killed run that had this process's id: its folder is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_staging(shards_dir: Path) -> None:
    """Empty and remove staging folders of killed prepare runs (only the shard files they wrote)."""
    for folder in sorted(shards_dir.iterdir()):
        found = _STAGING.fullmatch(folder.name)
        if not found or folder.is_symlink() or not folder.is_dir() or \
                _pid_alive(int(found.group(1))):
            continue
        for path in folder.iterdir():
            if _OUR_SHARD.fullmatch(path.name) and path.is_file() and not path.is_symlink():
                path.unlink()
        try:
            folder.rmdir()
        except OSError:
            log.warning("%s: left in place: it holds files `aekt prepare` did not write", folder)


def _remove_stale(shards_dir: Path, keep: set[str]) -> None:
    """Delete our shard files that the new manifest no longer names (e.g. shard_size changed)."""
    for path in sorted(shards_dir.iterdir()):
        if _OUR_SHARD.fullmatch(path.name) and path.name not in keep:
            log.info("removing stale shard %s", path)
            path.unlink()


def _remove_stale_objects(shards_url: str, keep: set[str]) -> None:
    """Delete our shard objects under ``shards_url`` that the new manifest no longer names."""
    for name in list_names(shards_url):
        if _OUR_SHARD.fullmatch(name) and name not in keep:
            log.info("removing stale shard %s", join(shards_url, name))
            delete_object(join(shards_url, name))


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds without re-importing torch; the parent has run no
    # torch ops at this point, so no thread pools are copied in a bad state.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def prepare(cfg: DataConfig, *, shards_dir: Location, manifest_path: Path,
            progress: bool = True) -> Manifest:
    """Write every split of ``cfg``'s dataset as shards in ``shards_dir`` and its manifest.

    Idempotent: the same inputs give byte-identical shards and manifest; shards of ours that the
    new manifest does not name are removed. Raises DataError for missing or malformed sources and
    (with ``on_corrupt: fail``) for the first corrupt image.
    """
    remote, manifest_path = is_url(shards_dir), Path(manifest_path)
    if remote and not is_object_store(shards_dir):
        raise DataError(f"--shards-dir {shards_dir}: `aekt prepare` writes shards to a local folder or an "
                        "object store (s3://, gs://, …), not to a pipe: command or an http(s):// server.")
    plan: SourcePlan = open_source(cfg)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    staging = None
    if not remote:
        shards_dir = Path(shards_dir)
        shards_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_staging(shards_dir)
        staging = shards_dir / f".prepare-{os.getpid()}"
        staging.mkdir()
    manifest_tmp = manifest_path.with_name(f".{manifest_path.name}.tmp-{os.getpid()}")
    exts: set[str] = set()
    shapes: set[tuple[int, ...]] = set()
    splits: dict[str, SplitInfo] = {}
    pool = _pool_context().Pool(cfg.workers) if cfg.workers > 0 else None
    try:
        for split, items in plan.splits.items():
            splits[split] = _write_split(split, items, cfg=cfg, channels=plan.channels,
                                         shards_dir=shards_dir, staging=staging, pool=pool,
                                         progress=progress, exts=exts, shapes=shapes)
        fmt = "raw" if exts == {"npy"} else exts.pop() if len(exts) == 1 else "mixed"
        manifest = Manifest.build(
            dataset=cfg.name, source=plan.description, classes=plan.classes,
            channels=plan.channels, image_format=fmt, shard_size=cfg.shard_size, splits=splits,
            image_shape=shapes.pop() if fmt == "raw" else None)
        write_new(manifest_tmp, manifest.to_json().encode("utf-8"), shown=manifest_path)
        # Everything is written: renames only from here on (no data, so no disk-full failure).
        for path in sorted(staging.iterdir()) if staging else ():
            os.replace(path, shards_dir / path.name)
        os.replace(manifest_tmp, manifest_path)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for path in staging.iterdir() if staging else ():  # after a failure: only the files this run wrote
            path.unlink()
        if staging:
            staging.rmdir()
        manifest_tmp.unlink(missing_ok=True)
    keep = {sh.name for s in splits.values() for sh in s.shards}
    if remote:
        _remove_stale_objects(str(shards_dir), keep)
    else:
        _remove_stale(shards_dir, keep)
    log.info("wrote %s (sha256 %s)", manifest_path, manifest.sha256)
    return manifest
