"""Prepare stage: source -> verified/encoded samples -> WebDataset shards + manifest.

Workers (``cfg.workers`` processes) do the per-image work (PNG encoding of pixel rows, one full
decode of every source file); the parent assigns indices in stable order and writes the shards,
so the output does not depend on the worker count. Rerunning with the same inputs rewrites
byte-identical shards and manifest.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import DataConfig
from pipeline.data.images import encode_png, verify_for_storage
from pipeline.data.manifest import Manifest, ShardInfo, SplitInfo
from pipeline.data.samples import DataError, ImageDecodeError, RawItem, Sample, make_key
from pipeline.data.shards import shard_name, write_shard
from pipeline.data.sources import SourcePlan, open_source

log = logging.getLogger(__name__)

_OUR_SHARD = re.compile(r"(?:train|test)-\d{5}\.tar|\.(?:train|test)-\d{5}\.tar\.tmp-\d+")


def encode_item(item: RawItem, *, channels: int) -> tuple[bytes, str] | str:
    """(bytes to store, ext) for one item, or the decode error message for a corrupt image.

    Pixel rows are ours to encode, so they need no verification; source files are decoded once.
    Runs in worker processes: returns the error instead of raising so the parent applies
    ``on_corrupt`` in stable order.
    """
    if isinstance(item.payload, np.ndarray):
        return encode_png(item.payload), "png"
    try:
        return verify_for_storage(item.payload.read(), channels=channels, name=item.name)
    except ImageDecodeError as exc:
        return str(exc)


def _encoded(items: list[RawItem], channels: int, pool: multiprocessing.pool.Pool | None,
             workers: int) -> Iterator[tuple[bytes, str] | str]:
    encode = functools.partial(encode_item, channels=channels)
    if pool is None:
        return map(encode, items)
    # Chunks amortise the IPC round trip (~100 us) over many ~50 us PNG encodes.
    chunksize = max(1, min(256, len(items) // (workers * 8)))
    return pool.imap(encode, items, chunksize=chunksize)


def _write_split(split: str, items: list[RawItem], *, cfg: DataConfig, channels: int,
                 shards_dir: Path, pool: multiprocessing.pool.Pool | None, progress: bool,
                 exts: set[str]) -> SplitInfo:
    shards: list[ShardInfo] = []
    skipped: list[str] = []
    buffer: list[Sample] = []

    def flush() -> None:
        name = shard_name(split, len(shards))
        sha = write_shard(shards_dir / name, buffer)
        shards.append(ShardInfo(name=name, count=len(buffer), start=buffer[0].index,
                                end=buffer[-1].index + 1, sha256=sha))
        buffer.clear()

    started = time.perf_counter()
    results = tqdm(_encoded(items, channels, pool, cfg.workers), total=len(items),
                   desc=f"{cfg.name}/{split}", unit="img", disable=not progress)
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


def _remove_stale(shards_dir: Path, keep: set[str]) -> None:
    """Delete our shard files that the new manifest no longer names (e.g. shard_size changed)."""
    for path in sorted(shards_dir.iterdir()):
        if _OUR_SHARD.fullmatch(path.name) and path.name not in keep:
            log.info("removing stale shard %s", path)
            path.unlink()


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds without re-importing torch; the parent has run no
    # torch ops at this point, so no thread pools are copied in a bad state.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def prepare(cfg: DataConfig, *, shards_dir: Path, manifest_path: Path,
            progress: bool = True) -> Manifest:
    """Write every split of ``cfg``'s dataset as shards in ``shards_dir`` and its manifest.

    Idempotent: the same inputs give byte-identical shards and manifest; shards of ours that the
    new manifest does not name are removed. Raises DataError for missing or malformed sources and
    (with ``on_corrupt: fail``) for the first corrupt image.
    """
    shards_dir, manifest_path = Path(shards_dir), Path(manifest_path)
    plan: SourcePlan = open_source(cfg)
    shards_dir.mkdir(parents=True, exist_ok=True)
    exts: set[str] = set()
    splits: dict[str, SplitInfo] = {}
    pool = _pool_context().Pool(cfg.workers) if cfg.workers > 0 else None
    try:
        for split, items in plan.splits.items():
            splits[split] = _write_split(split, items, cfg=cfg, channels=plan.channels,
                                         shards_dir=shards_dir, pool=pool, progress=progress,
                                         exts=exts)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    _remove_stale(shards_dir, {sh.name for s in splits.values() for sh in s.shards})
    manifest = Manifest.build(
        dataset=cfg.name, source=plan.description, classes=plan.classes, channels=plan.channels,
        image_format=exts.pop() if len(exts) == 1 else "mixed", shard_size=cfg.shard_size,
        splits=splits)
    manifest.save(manifest_path)
    log.info("wrote %s (sha256 %s)", manifest_path, manifest.sha256)
    return manifest
