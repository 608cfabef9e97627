"""Stage-2 data path: JPEG vs raw shards, per-sample vs batch streaming, and epoch vs step ceiling.

Real CIFAR-10 JPEGs (``../shared/data/cifar10-images``) go through the real ``prepare`` twice, as
encoded (JPEG bytes) and raw (uint8 ``.npy``) shards; a real stage-1 store (one view per epoch's
worth, an untrained resnet8x4 teacher: speed does not depend on its weights) gives the cached
logits. Side by side, in interleaved rounds:

- **loader**: samples/s of one process (``num_workers=0``: the rate of one DataLoader worker)
  through the student's training stream (cached logits + stored params, batch augmentation
  deferred to the device), for {jpg, raw} x {per-sample dicts + default collate (today's path
  before batch streaming), whole batches (``ShardStream.batched``)}. Goal: raw + batch >= 5x
  jpg + per-sample.
- **epoch vs step** (``--epoch-batches``): the real ``train_epoch`` (loader, augmentation on the
  device, cached-AEKT step, bookkeeping) vs ``train_step`` alone over the same batches already in
  memory (the ``student_step`` ceiling) at each batch size. Goal on a GPU: epoch >= 0.8x step.

Usage::

    python -m bench.loader                         # CPU: 4,000 images in 1,000-image shards (the preset's)
    python -m bench.loader --device cuda --samples 50000 --epoch-batches 64,256,1024 --workers 8
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bench.common import (
    SHARED_DATA,
    base_parser,
    csv_ints,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    paired_ratio,
    prepare_run,
    profile_top,
    summary,
)
from pipeline.augment import Normalization
from pipeline.cache.build import expected_provenance
from pipeline.cache.store import LogitStore
from pipeline.cache.writer import ShardSource, write_items
from pipeline.config import AugmentConfig, CacheConfig, DataConfig, LossConfig, ScheduleConfig
from pipeline.data import Manifest, prepare
from pipeline.distributed import make_accelerator
from pipeline.heads import build_param_groups
from pipeline.models import build_model
from pipeline.stream import ShardStream, StreamSpec
from pipeline.student import build_student
from pipeline.train import TrainJob, train_epoch, train_step

NAME = "loader"
CIFAR10 = SHARED_DATA / "cifar10-images"
TARGETS = {"raw_batch_over_jpg_sample": 5.0, "epoch_over_step": 0.8,
           "applies_to": "loader ratio on CPU per worker; epoch/step on a GPU (issue 20)"}
FORMATS = ("encoded", "raw")


def prepare_both(workdir: Path, samples: int, shard_size: int) -> dict[str, tuple[Manifest, Path, Path]]:
    """The same CIFAR-10 images as JPEG and as raw shards: {format: (manifest, shards, manifest path)}."""
    if not (CIFAR10 / "train.tar").is_file():
        raise SystemExit(f"{CIFAR10}/train.tar not found: this benchmark reads the real CIFAR-10 JPEGs.")
    out = {}
    for fmt in FORMATS:
        cfg = DataConfig(source="folder", name=f"c10-{fmt}", root=str(CIFAR10), format=fmt,
                         max_per_class=max(1, -(-samples // 10)), shard_size=shard_size)
        path = workdir / f"{fmt}.json"
        out[fmt] = (prepare(cfg, shards_dir=workdir / fmt, manifest_path=path, progress=False), workdir / fmt, path)
    return out


def build_store(workdir: Path, manifest: Manifest, shards: Path, device: torch.device, views: int) -> Path:
    """A real stage-1 store for the raw shards (both formats decode to the same pixels and indices)."""
    aug = AugmentConfig(recipe="cifar", seed=0, views=views)
    cfg = CacheConfig(codec="fp16", batch_size=256)
    teacher = build_model("resnet8x4", num_classes=manifest.num_classes).to(device).eval()
    card = {"arch": "resnet8x4", "num_classes": manifest.num_classes, "sha256": "benchmark-untrained",
            "input_norm": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    store = LogitStore.create(workdir / "store.zarr", expected_provenance(manifest, card, cfg, aug),
                              compressor=cfg.compressor, clevel=cfg.clevel)
    items = [(v, s) for v in range(views) for s in range(len(manifest.splits["train"].shards))]
    write_items(store, ShardSource(manifest, shards), teacher, items, cfg, aug,
                norm=Normalization.from_card(card), device=device, progress=False)
    return workdir / "store.zarr"


def stream_for(paths: tuple[Manifest, Path, Path], store: Path, views: int) -> ShardStream:
    _, shards, manifest_path = paths
    spec = StreamSpec(manifest_path=manifest_path, shards_dir=shards, split="train", recipe="cifar", image_size=32,
                      aug_seed=0, views=views, store_path=store, batch_augment=True)
    return ShardStream(spec, epoch=1)


def loader_cases(streams: dict[str, ShardStream], batch: int) -> dict[str, Any]:
    def per_sample(stream: ShardStream) -> int:
        return sum(len(b["label"]) for b in DataLoader(stream, batch_size=batch, num_workers=0))

    def batched(stream: ShardStream) -> int:
        return sum(len(b["label"]) for b in DataLoader(stream.batched(batch), batch_size=None, num_workers=0))

    cases = {}
    for fmt, stream in streams.items():
        ext = "jpg" if fmt == "encoded" else "raw"
        cases[f"{ext}/sample"] = lambda s=stream: per_sample(s)
        cases[f"{ext}/batch"] = lambda s=stream: batched(s)
    return cases


def epoch_vs_step(paths: tuple[Manifest, Path, Path], store: Path, views: int, *, batch: int, device: torch.device,
                  precision: str, workers: int, rounds: int) -> dict[str, Any]:
    """The real train_epoch vs train_step over the same batches held in memory, at ``batch``."""
    manifest, shards, manifest_path = paths
    loss = LossConfig(name="aekt")
    sched = ScheduleConfig(epochs=views, batch_size=batch, lr=0.01, workers=workers, mixed_precision=precision)
    spec = dict(manifest_path=manifest_path, shards_dir=shards, recipe="cifar", image_size=32, aug_seed=0,
                views=views)
    accelerator = make_accelerator(cpu=device.type == "cpu", mixed_precision=precision)
    torch.manual_seed(0)
    student = build_student("resnet8x4", manifest, loss, seed=0)
    job = TrainJob(model=student, sched=sched, loss=loss, progress=False,
                   train=StreamSpec(split="train", store_path=store, batch_augment=True, **spec),
                   test=StreamSpec(split="test", train=False, **spec))
    model = student.to(accelerator.device)
    groups = build_param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_scale=loss.head_lr_scale,
                                no_decay_norm_bias=False)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(groups, lr=0.01, momentum=0.9))
    stream = ShardStream(job.train)
    held = list(DataLoader(stream.batched(batch), batch_size=None))  # the epoch's batches, in memory
    n = sum(len(b["label"]) for b in held)
    train_epoch(job, accelerator, model, optimizer, stream, 1)  # warm-up: allocator, cuDNN autotuning

    def epoch() -> int:
        return int(train_epoch(job, accelerator, model, optimizer, stream, 1)["samples"])

    def steps() -> int:
        for b in held:
            train_step(job, accelerator, model, optimizer, b, 1.0)
        return n

    rates = interleaved({"epoch": epoch, "step": steps}, rounds=rounds, device=device)
    return {"batch": batch, "samples": n, "epoch": summary(rates["epoch"]), "step": summary(rates["step"]),
            "epoch_over_step": paired_ratio(rates["epoch"], rates["step"])}


def run(*, device: str = "cpu", samples: int = 4000, shard_size: int = 1000, batch: int = 64,
        epoch_batches: Sequence[int] = (64,), workers: int = 0, rounds: int = 3, precision: str | None = None,
        threads: int | None = None, profile: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    dev, precision = prepare_run(device, threads, precision)
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-", dir=workdir))
    views = 2
    try:
        started = time.perf_counter()
        paths = prepare_both(tmp, samples, shard_size)
        store = build_store(tmp, paths["raw"][0], paths["raw"][1], dev, views)
        setup_s = time.perf_counter() - started
        streams = {fmt: stream_for(paths[fmt], store, views) for fmt in FORMATS}
        cases = loader_cases(streams, batch)
        for fn in cases.values():  # warm-up: page cache, zarr metadata, lazy imports
            fn()
        rates = interleaved(cases, rounds=rounds, device=torch.device("cpu"))
        loader = {name: summary(r) for name, r in rates.items()}
        ratios = {"raw_batch_over_jpg_sample": paired_ratio(rates["raw/batch"], rates["jpg/sample"]),
                  "raw_sample_over_jpg_sample": paired_ratio(rates["raw/sample"], rates["jpg/sample"]),
                  "jpg_batch_over_jpg_sample": paired_ratio(rates["jpg/batch"], rates["jpg/sample"]),
                  "raw_batch_over_raw_sample": paired_ratio(rates["raw/batch"], rates["raw/sample"])}
        epochs = [epoch_vs_step(paths["raw"], store, views, batch=b, device=dev, precision=precision,
                                workers=workers, rounds=rounds) for b in epoch_batches]
        payload: dict[str, Any] = {
            "benchmark": NAME, "machine": machine_info(dev),
            "config": {"samples": paths["raw"][0].splits["train"].num_samples, "shard_size": shard_size,
                       "loader_batch": batch, "epoch_batches": list(epoch_batches), "workers_in_epoch": workers,
                       "precision": precision, "rounds": rounds, "data": "real CIFAR-10 JPEGs (train.tar)",
                       "setup_seconds": setup_s},
            "targets": TARGETS, "loader_samples_per_s": loader, "loader_ratios": ratios, "epoch_vs_step": epochs}
        if profile:
            payload["profile_jpg_sample"] = profile_top(cases["jpg/sample"])
            payload["profile_raw_batch"] = profile_top(cases["raw/batch"])
        return payload
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(p: dict[str, Any]) -> str:
    cfg, loader, ratios = p["config"], p["loader_samples_per_s"], p["loader_ratios"]
    rows = [[name, r["median"], r["min"], r["max"]] for name, r in loader.items()]
    text = (f"loader on {p['machine']['device_name']}: {cfg['samples']} CIFAR-10 images, batch {cfg['loader_batch']}, "
            f"one process, samples/s (median of {cfg['rounds']} rounds)\n"
            + format_table(["format/stream", "median", "min", "max"], rows)
            + "\n" + "\n".join(f"{k}: {v['median']:.2f}" for k, v in ratios.items())
            + f"  (target raw_batch_over_jpg_sample >= {TARGETS['raw_batch_over_jpg_sample']})")
    erows = [[e["batch"], e["epoch"]["median"], e["step"]["median"], e["epoch_over_step"]["median"]]
             for e in p["epoch_vs_step"]]
    return text + "\n\nstudent epoch vs step ceiling (resnet8x4, cached AEKT), img/s\n" + format_table(
        ["batch", "train_epoch", "train_step", "ratio"], erows) + f"  (target >= {TARGETS['epoch_over_step']} on a GPU)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000, help="training images (max_per_class = samples/10)")
    parser.add_argument("--shard-size", type=int, default=1000, help="the CIFAR-10 preset's shard size")
    parser.add_argument("--batch", type=int, default=64, help="loader batch size")
    parser.add_argument("--epoch-batches", type=csv_ints, default=[64],
                        help="batch sizes of the epoch-vs-step comparison (empty: skip it)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers inside train_epoch")
    args = parser.parse_args(argv)
    payload = run(device=args.device, samples=args.samples, shard_size=args.shard_size, batch=args.batch,
                  epoch_batches=args.epoch_batches, workers=args.workers, rounds=args.rounds,
                  precision=args.precision, threads=args.threads, profile=args.profile)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
