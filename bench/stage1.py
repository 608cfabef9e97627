"""Stage-1 throughput: the real cache writer (``write_items``) vs a forward-only teacher loop, per codec.

A real ``prepare`` writes shards and a manifest into a temporary folder (sklearn digits, or an
ImageFolder tree of random smooth 32x32 RGB PNGs for a CIFAR-shaped run); the teacher is an
untrained zoo model (speed does not depend on its weights). Per round, side by side:

- ``forward-only``: ``pipeline.cache.writer.teacher_logits`` over the same augmented uint8 views,
  already in memory (the ceiling: no reading, decoding, encoding or writing);
- per codec: ``write_items`` on a fresh store, the whole stage-1 path (shard read + PNG decode +
  augment in a DataLoader, teacher, encode + Zarr write + done marker on the writer thread).

Components (data path, encode, write) are timed once each, to say where the gap goes. Usage::

    python -m bench.stage1                                     # CPU, digits, ~1 min
    python -m bench.stage1 --device cuda --dataset cifar-synthetic --samples 20000 --workers 8
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.common import (
    SHARED_DATA,
    base_parser,
    csv_strs,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    memory_format,
    paired_ratio,
    prepare_run,
    profile_top,
    summary,
    timed,
)
from pipeline.augment import Normalization
from pipeline.cache.build import expected_provenance
from pipeline.cache.codecs import CODEC_NAMES
from pipeline.cache.store import LogitStore
from pipeline.cache.writer import ShardSource, _ViewItems, teacher_logits, write_items
from pipeline.config import AugmentConfig, CacheConfig, DataConfig
from pipeline.data import Manifest, prepare
from pipeline.data.images import encode_png
from pipeline.models import build_model

NAME = "stage1"
TARGET = {"stage1_over_forward": 0.8}
DATASETS = {"digits": ("digits_cnn", "digits"), "cifar-synthetic": ("resnet32x4", "cifar"),
            "cifar10": ("resnet32x4", "cifar"), "cifar10-jpg": ("resnet32x4", "cifar")}
CIFAR10 = SHARED_DATA / "cifar10-images"


def write_synthetic_folder(root: Path, *, classes: int, per_class: int, size: int = 32,
                           seed: int = 0) -> Path:
    """ImageFolder tree of smooth random RGB PNGs (upsampled 8x8 noise: compresses like photos)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", 1)):
        for c in range(classes):
            folder = root / split / f"c{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                low = torch.from_numpy(rng.integers(0, 256, (1, 3, 8, 8)).astype(np.float32))
                img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear")[0]
                (folder / f"{i:05d}.png").write_bytes(encode_png(img.permute(1, 2, 0).byte().numpy()))
    return root


def prepare_dataset(kind: str, workdir: Path, *, samples: int | None,
                    shard_size: int) -> tuple[Manifest, Path, Path]:
    """Run the real ``prepare`` into ``workdir``: (manifest, shards_dir, manifest_path)."""
    if kind == "digits":
        # ~135 training digits per class: max_per_class caps the size when asked.
        cap = None if samples is None else max(1, -(-samples // 10))
        cfg = DataConfig(source="digits", name="digits", shard_size=shard_size, max_per_class=cap)
    elif kind == "cifar-synthetic":
        per_class = max(1, -(-(samples or 1000) // 100))
        src = write_synthetic_folder(workdir / "src", classes=100, per_class=per_class)
        cfg = DataConfig(source="folder", root=str(src), name="cifar_synthetic", shard_size=shard_size)
    elif kind in ("cifar10", "cifar10-jpg"):  # the real CIFAR-10 JPEGs: raw shards (the preset's) or JPEG
        if not (CIFAR10 / "train.tar").is_file():
            raise SystemExit(f"{CIFAR10}/train.tar not found: --dataset {kind} reads the real CIFAR-10 JPEGs.")
        cfg = DataConfig(source="folder", root=str(CIFAR10), name=kind, shard_size=shard_size,
                         max_per_class=max(1, -(-(samples or 1000) // 10)),
                         format="raw" if kind == "cifar10" else "encoded")
    else:
        raise ValueError(f"unknown dataset {kind!r}; valid: {', '.join(DATASETS)}")
    shards, manifest_path = workdir / "shards", workdir / f"{cfg.name}.json"
    manifest = prepare(cfg, shards_dir=shards, manifest_path=manifest_path, progress=False)
    return manifest, shards, manifest_path


def make_store(path: Path, manifest: Manifest, teacher_arch: str, cfg: CacheConfig,
               aug: AugmentConfig) -> LogitStore:
    """A fresh store with the provenance stage 1 would give it (teacher hash: a placeholder)."""
    card = {"arch": teacher_arch, "num_classes": manifest.num_classes, "sha256": "benchmark-untrained",
            "input_norm": Normalization.of_recipe(aug.recipe).to_dict()}
    prov = expected_provenance(manifest, card, cfg, aug)
    return LogitStore.create(path, prov, compressor=cfg.compressor, clevel=cfg.clevel)


def load_views(source: ShardSource, items: list[tuple[int, int]], cfg: CacheConfig, aug: AugmentConfig,
               device: torch.device) -> list[dict]:
    # The writer's own dataset and DataLoader settings, so the data path timed here is stage 1's.
    loader = DataLoader(_ViewItems(source, items, aug), batch_size=None, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    return list(loader)


def run(*, device: str = "cpu", dataset: str = "digits", codecs: Sequence[str] = CODEC_NAMES,
        views: int = 4, samples: int | None = None, shard_size: int = 128, batch_size: int = 256,
        workers: int = 0, topk: int | None = None, rounds: int = 3, precision: str | None = None,
        threads: int | None = None, profile: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    dev, precision = prepare_run(device, threads, precision)
    arch, recipe = DATASETS[dataset]
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage1-", dir=workdir))
    try:
        manifest, shards, _ = prepare_dataset(dataset, tmp, samples=samples, shard_size=shard_size)
        n_classes = manifest.num_classes
        k = topk if topk is not None else min(20, n_classes // 2)  # k < C, so the tail path is exercised
        aug = AugmentConfig(recipe=recipe, seed=0, views=views)
        norm = Normalization.of_recipe(recipe)  # a zoo teacher built here: its recipe's statistics
        source = ShardSource(manifest, shards)
        items = [(v, s) for v in range(views) for s in range(len(manifest.splits["train"].shards))]
        n_views = views * manifest.splits["train"].num_samples
        torch.manual_seed(0)
        teacher = build_model(arch, num_classes=n_classes, in_channels=manifest.channels)
        teacher.to(dev, memory_format=memory_format(dev)).eval()
        cfgs = {c: CacheConfig(codec=c, topk=k, batch_size=batch_size, mixed_precision=precision,
                               workers=workers) for c in codecs}
        base = next(iter(cfgs.values()))

        data_s, loaded = timed(lambda: load_views(source, items, base, aug, dev), dev)

        def forward_only() -> int:
            for item in loaded:
                teacher_logits(teacher, item["images"], norm, batch_size=batch_size, device=dev,
                               mixed_precision=precision)
            return n_views

        logits = [teacher_logits(teacher, it["images"], norm, batch_size=batch_size, device=dev,
                                 mixed_precision=precision) for it in loaded]  # warm-up + inputs
        # Fresh stores made before timing: creating one is a one-off, not per-sample work.
        stores = {c: [make_store(tmp / f"{c}-{r}.zarr", manifest, arch, cfgs[c], aug) for r in range(rounds)]
                  for c in codecs}

        def write_all(codec: str) -> int:
            write_items(stores[codec].pop(), source, teacher, items, cfgs[codec], aug, norm=norm, device=dev,
                        progress=False)
            return n_views

        cases = {"forward_only": forward_only, **{c: functools.partial(write_all, c) for c in codecs}}
        rates = interleaved(cases, rounds=rounds, device=dev)
        results = {}
        for codec in codecs:
            store = make_store(tmp / f"{codec}-parts.zarr", manifest, arch, cfgs[codec], aug)
            enc_s, encoded = timed(lambda: [store.codec.encode(z, np.asarray(it["labels"]))  # noqa: B023
                                            for z, it in zip(logits, loaded, strict=True)], dev)

            def write_rows(st: LogitStore = store, enc: list = encoded) -> None:
                for it, arrays in zip(loaded, enc, strict=True):
                    st.write_row(it["view"], it["shard"], arrays, np.asarray(it["params"]))
                    st.mark_done(it["view"], it["shard"])

            write_s, _ = timed(write_rows, dev)
            disk = store.disk_bytes()
            results[codec] = {
                "sample_views_per_s": summary(rates[codec])["median"], "rounds": rates[codec],
                "ratio_to_forward_only": paired_ratio(rates[codec], rates["forward_only"]),
                "encode_sample_views_per_s": n_views / enc_s, "write_sample_views_per_s": n_views / write_s,
                "disk_bytes_per_sample_view": sum(v for a, v in disk.items() if a not in ("params", "done"))
                / n_views, "disk_bytes": disk}
        payload: dict[str, Any] = {
            "benchmark": NAME, "machine": machine_info(dev),
            "config": {"dataset": dataset, "teacher": arch, "recipe": recipe, "num_classes": n_classes,
                       "samples": manifest.splits["train"].num_samples, "views": views,
                       "sample_views": n_views, "shard_size": shard_size, "batch_size": batch_size,
                       "workers": workers, "precision": precision, "topk": k, "rounds": rounds,
                       "compressor": base.compressor, "clevel": base.clevel},
            "targets": TARGET,
            "forward_only_sample_views_per_s": summary(rates["forward_only"]),
            "data_path_sample_views_per_s": n_views / data_s,
            "codecs": results}
        if profile:
            st = make_store(tmp / "profile.zarr", manifest, arch, cfgs[codecs[0]], aug)
            payload["profile_write_items"] = profile_top(lambda: write_items(
                st, source, teacher, items, cfgs[codecs[0]], aug, norm=norm, device=dev, progress=False))
        return payload
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(p: dict[str, Any]) -> str:
    fwd = p["forward_only_sample_views_per_s"]["median"]
    rows = [[c, r["sample_views_per_s"], fwd, r["ratio_to_forward_only"]["median"],
             p["data_path_sample_views_per_s"], r["encode_sample_views_per_s"],
             r["write_sample_views_per_s"], r["disk_bytes_per_sample_view"]]
            for c, r in p["codecs"].items()]
    cfg = p["config"]
    return (f"stage1 on {p['machine']['device_name']}: {cfg['dataset']} ({cfg['sample_views']} "
            f"sample-views, teacher {cfg['teacher']}), sample-views/s, median of {cfg['rounds']} rounds; "
            "target ratio >= 0.8\n"
            + format_table(["codec", "write_items", "fwd only", "ratio", "data path", "encode", "write",
                            "B/sv disk"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="digits")
    parser.add_argument("--codecs", type=csv_strs, default=list(CODEC_NAMES))
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--samples", type=int, default=None, help="training samples (default: all digits)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="teacher batch (cache.batch_size)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (cache.workers)")
    parser.add_argument("--topk", type=int, default=None, help="k of the topk codec (default min(20, C/2))")
    args = parser.parse_args(argv)
    payload = run(device=args.device, dataset=args.dataset, codecs=args.codecs, views=args.views,
                  samples=args.samples, shard_size=args.shard_size, batch_size=args.batch,
                  workers=args.workers,
                  topk=args.topk, rounds=args.rounds, precision=args.precision, threads=args.threads,
                  profile=args.profile)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
