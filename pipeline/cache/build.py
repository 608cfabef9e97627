"""Stage 1 entry point: build (or resume) the teacher-logit store under Accelerate."""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline import augment
from pipeline.artifacts import load_model
from pipeline.cache.store import CacheError, LogitStore, Provenance
from pipeline.cache.store_folder import refuse_to_replace
from pipeline.cache.writer import (
    ShardSource,
    open_or_create,
    pending_items,
    split_items,
    store_lock,
    write_items,
)
from pipeline.config import AugmentConfig, CacheConfig
from pipeline.data import Manifest
from pipeline.data.location import Location, as_location, is_object_store
from pipeline.device_decode import pixel_source
from pipeline.distributed import check_same_inputs, make_accelerator

log = logging.getLogger(__name__)


def pixel_source_of(manifest: Manifest, aug: AugmentConfig, device_type: str) -> str:
    """The pixel source of ``aug.decode`` on ``device_type``; raw shards hold pixels: always "pil"."""
    if aug.decode == "pil" or manifest.image_format == "raw":
        return "pil"
    return pixel_source(aug.decode, device_type)


def expected_provenance(manifest: Manifest, teacher_card: dict[str, Any], cfg: CacheConfig,
                        aug: AugmentConfig, device_type: str = "cpu") -> Provenance:
    """The provenance a store built from these inputs on ``device_type`` carries (stage 2 recomputes
    it for its own device and compares)."""
    split = manifest.splits["train"]
    for i, shard in enumerate(split.shards):
        if shard.start != i * manifest.shard_size or shard.count != shard.end - shard.start:
            raise CacheError(f"manifest {manifest.dataset}: shard {shard.name} covers [{shard.start}, "
                             f"{shard.end}) but shards must be contiguous runs of shard_size "
                             f"{manifest.shard_size}; rerun `aekt prepare`.")
    if teacher_card["num_classes"] != manifest.num_classes:
        raise CacheError(f"teacher {teacher_card['arch']} has {teacher_card['num_classes']} classes but "
                         f"dataset {manifest.dataset} has {manifest.num_classes}; retrain or import a "
                         "matching teacher (`aekt teacher`).")
    codec_params = {"k": cfg.topk} if cfg.codec == "topk" else {}
    return Provenance(
        dataset=manifest.dataset, manifest_sha256=manifest.sha256, teacher_arch=teacher_card["arch"],
        teacher_sha256=teacher_card["sha256"], teacher_precision=cfg.mixed_precision,
        teacher_input_norm=augment.Normalization.from_card(teacher_card).to_dict(), recipe=aug.recipe,
        augment_seed=aug.seed,
        image_size=aug.size, views=aug.views, codec=cfg.codec, codec_params=codec_params,
        num_classes=manifest.num_classes, num_samples=split.num_samples,
        shard_size=manifest.shard_size, num_params=augment.recipe_info(aug.recipe).num_params,
        pixel_source=pixel_source_of(manifest, aug, device_type))


def store_bytes_estimate(prov: Provenance) -> int:
    """Uncompressed bytes of a complete store: codec rows + float32 params for every sample-view.
    Blosc/zstd hardly shrinks logits (digits fp16: 213 KB on disk for 215 KB raw), so this is close."""
    per_row = prov.make_codec().raw_bytes_per_row(prov.num_classes) + 4 * prov.num_params
    return prov.views * prov.num_samples * per_row


def check_free_space(store_path: Location, prov: Provenance) -> None:
    """Refuse to start stage 1 when the store cannot fit: a full disk found after hours of teacher
    work would waste them (rows written so far are kept, but nothing else can proceed). An object
    store has no free-space figure to check (a bucket quota shows as a write error that names the row)."""
    if is_object_store(store_path):
        log.info("%s: object store, no free-space check (about %.2f GB to write)", store_path,
                 store_bytes_estimate(prov) / 1e9)
        return
    store_path = Path(store_path)
    need = store_bytes_estimate(prov)
    if store_path.is_dir():  # resuming (or rebuilding beside it): what is already there counts
        need -= sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file())
    parent = next((p for p in (store_path.parent, *store_path.parent.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise CacheError(f"{store_path}: the store needs about {need / 1e9:.2f} GB more ({prov.views} views x "
                         f"{prov.num_samples} samples, codec {prov.codec}) but {parent} has {free / 1e9:.2f} GB "
                         "free; free space, put the store on a larger disk (--store), or use fewer "
                         "augment.views or a smaller cache.codec (int8, topk).")


def describe_shards(shards: list[int], limit: int = 16) -> str:
    """``shards 1, 3, 5`` (the first ``limit`` and a count beyond): which shards a rank works on, so a
    node's log says which shard files it reads (on a multi-node run, from the shared file system)."""
    if not shards:
        return "no shards"
    shown = ", ".join(map(str, shards[:limit]))
    return f"shards {shown}" + (f", … ({len(shards)} shards)" if len(shards) > limit else "")


def build_cache(*, manifest_path: Path, shards_dir: Location, teacher_path: Path, store_path: Location,
                cfg: CacheConfig, aug: AugmentConfig, rebuild: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Write every missing (view, shard) chunk row; returns a summary (items, seconds, bytes)."""
    store_path = as_location(store_path)  # a local folder or an object-store URL
    refuse_to_replace(store_path, quick=True)  # a wrong --store fails before any work or lock
    accelerator = make_accelerator(cpu=not torch.cuda.is_available())
    manifest = Manifest.load(manifest_path)
    teacher, card = load_model(teacher_path)
    prov = expected_provenance(manifest, card, cfg, aug, accelerator.device.type)
    check_same_inputs({name: json.dumps(value, sort_keys=True) for name, value in asdict(prov).items()},
                      world=accelerator.num_processes)  # one store from one set of inputs, on every node
    check_free_space(store_path, prov)  # before the lock, the teacher on the device, any row
    source = ShardSource(manifest, as_location(shards_dir))
    main = accelerator.is_main_process
    start = time.perf_counter()
    with store_lock(store_path) if main else nullcontext():
        if main:
            store = open_or_create(store_path, prov, cfg, rebuild=rebuild)
        accelerator.wait_for_everyone()
        if not main:
            store = LogitStore.open(store_path, mode="r+")
        items = pending_items(store)
        # Nobody writes a marker before every rank has read the same list of pending items.
        accelerator.wait_for_everyone()
        mine = split_items(items, accelerator.process_index, accelerator.num_processes)
        total = prov.views * prov.num_shards
        log.info("rank %d: %d of %d (view, shard) items pending, %d mine (%s)", accelerator.process_index,
                 len(items), total, len(mine), describe_shards(sorted({s for _, s in mine})))
        teacher.to(accelerator.device).eval()
        if accelerator.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            teacher.to(memory_format=torch.channels_last)
        written = write_items(store, source, teacher, mine, cfg, aug, norm=augment.Normalization.from_card(card),
                              device=accelerator.device,
                              progress=progress, main=main)
        accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    samples = sum(prov.shard_range(s)[1] - prov.shard_range(s)[0] for _, s in mine)
    return {"items_total": total, "items_pending": len(items), "items_written_here": written,
            "samples_written_here": samples, "seconds": seconds,
            "processes": accelerator.num_processes, "disk_bytes": store.disk_bytes() if main else {}}
