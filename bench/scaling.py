"""How stage 1 and stage 2 grow with N samples and V views, and what that means for ImageNet.

Measured here, on digits through the real code (``prepare`` -> ``write_items`` -> one
``train_epoch`` of a cached-AEKT digits_mlp over ``ShardStream``): stage-1 seconds and stage-2
seconds per epoch (and the DataLoader alone) for 3 sizes of N at fixed V and 3 values of V at the
full N, each fitted with a straight line. Then, for ImageNet (1,281,167 training images, C=1000,
V = 10 and 100), per codec:

- cache size = N * V * (measured on-disk bytes per sample-view of a synthetic C=1000 store, logits
  payload + augmentation params), plus the filesystem blocks those files really occupy and the
  number of chunk files (which DVC hashes one by one);
- stage-1 time = N * V / min(decode rate, teacher forward rate, writer rate), assuming the three
  overlap (DataLoader workers, GPU, writer thread) on one GPU. Decode and forward rates are the
  design doc's H100-machine measurements (DESIGN.md "Speed"), not ours; the writer rate (encode +
  Zarr write + done marker, one thread) is measured here at C=1000. Usage::

    python -m bench.scaling                   # CPU, ~1 min
    python -m bench.scaling --device cuda --workers 4
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.cache_read import build_synthetic_store, payload_bytes
from bench.common import (
    base_parser,
    csv_ints,
    csv_strs,
    finish_cli,
    format_table,
    linear_fit,
    machine_info,
    memory_format,
    prepare_run,
    profile_top,
    timed,
)
from bench.stage1 import make_store, prepare_dataset
from bench.student_step import bench_accelerator
from pipeline.augment import Normalization
from pipeline.cache.codecs import CODEC_NAMES, make_codec
from pipeline.cache.writer import ShardSource, write_items
from pipeline.config import AugmentConfig, CacheConfig, LossConfig, TrainConfig
from pipeline.heads import build_param_groups
from pipeline.models import build_model
from pipeline.stream import ShardStream, StreamSpec
from pipeline.student import build_student
from pipeline.train import TrainJob, build_loader, train_epoch

NAME = "scaling"
IMAGENET_TRAIN = 1_281_167
# DESIGN.md "Speed: where the time goes": one H100, 16 cores, real ImageNet JPEGs. Quoted, not ours.
DESIGN_RATES = {"pil_decode_16_cores": 4400.0, "gpu_decode_batch256": 9500.0,
                "resnet50_bf16_forward": 12800.0, "resnet34_bf16_forward": 24400.0}
DESIGN_SOURCE = ("DESIGN.md 'Speed: where the time goes' (one H100, 16 cores, real ImageNet JPEGs): the "
                 "design doc's measurements, not ours")
ASSUMPTIONS = [
    "bytes per sample-view measured on synthetic C=1000 logits (see cache_read), 2048 samples; the "
    "compressed size scales linearly with N*V",
    "params: the imagenet recipe's 5 float32 per sample-view, compressed as measured",
    "stage-1 rate = min(decode, teacher forward, writer): the three overlap on one GPU; one writer "
    "thread per process, its rate measured on this machine's CPU",
    "naive_digits_slope_hours: this machine's digits stage-1 seconds per sample-view times N*V; our "
    "per-sample overhead only, not ImageNet decode or forward cost",
    "files: one per (view, shard) chunk for each codec array, the params and the done marker"]
SCENARIOS = {"cpu_decode+resnet50": ("pil_decode_16_cores", "resnet50_bf16_forward"),
             "gpu_decode+resnet50": ("gpu_decode_batch256", "resnet50_bf16_forward")}


def measure_point(workdir: Path, *, samples: int | None, views: int, codec: str, shard_size: int,
                  workers: int, batch: int, rounds: int, accelerator: Any, precision: str,
                  profile: bool = False) -> dict[str, Any]:
    """Stage-1 seconds (fresh store each round) and stage-2 epoch / loader-only seconds for one (N, V)."""
    dev = accelerator.device
    manifest, shards, manifest_path = prepare_dataset("digits", workdir / f"n{samples}-v{views}",
                                                      samples=samples, shard_size=shard_size)
    cfg = CacheConfig(codec=codec, topk=5, workers=workers, mixed_precision=precision)
    aug = AugmentConfig(recipe="digits", seed=0, views=views)
    norm = Normalization.of_recipe("digits")
    source = ShardSource(manifest, shards)
    items = [(v, s) for v in range(views) for s in range(len(manifest.splits["train"].shards))]
    torch.manual_seed(0)
    teacher = build_model("digits_cnn", num_classes=manifest.num_classes, in_channels=manifest.channels)
    teacher.to(dev, memory_format=memory_format(dev)).eval()
    stage1 = []
    for r in range(rounds):
        store = make_store(workdir / f"n{samples}-v{views}-{r}.zarr", manifest, "digits_cnn", cfg, aug)
        stage1.append(timed(lambda st=store: write_items(st, source, teacher, items, cfg, aug, norm=norm, device=dev,
                                                         progress=False), dev)[0])
    loss = LossConfig(name="aekt", warmup_epochs=0)
    spec = StreamSpec(manifest_path=manifest_path, shards_dir=shards, split="train", recipe="digits",
                      image_size=8, aug_seed=0, views=views, store_path=store.path)
    model = build_student("digits_mlp", manifest, loss, 0)
    opt = torch.optim.SGD(build_param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_scale=0.01,
                                             no_decay_norm_bias=False), lr=0.01, momentum=0.9)
    wrapped, opt = accelerator.prepare(model, opt)
    sched = TrainConfig.from_params({"epochs": 1, "batch_size": batch, "workers": workers})
    job = TrainJob(model=model, sched=sched, loss=loss, train=spec, test=spec, progress=False)
    stream = ShardStream(spec)
    pin = dev.type == "cuda"
    stage2, loader = [], []
    for r in range(rounds):  # epoch r+1 reads view (r+1) mod V, as a real run would
        stage2.append(timed(lambda e=r + 1: train_epoch(job, accelerator, wrapped, opt, stream, e), dev)[0])
        loader.append(timed(lambda: sum(len(b["label"]) for b in build_loader(stream, batch, workers, pin)),
                            dev)[0])
    n = manifest.splits["train"].num_samples
    point = {"samples": n, "views": views, "sample_views": n * views, "stage1_s": float(np.median(stage1)),
             "stage2_epoch_s": float(np.median(stage2)), "loader_epoch_s": float(np.median(loader)),
             "stage1_rounds": stage1, "stage2_rounds": stage2, "loader_rounds": loader}
    if profile:
        point["profile_stage2_epoch"] = profile_top(
            lambda: train_epoch(job, accelerator, wrapped, opt, stream, 1))
        point["profile_stage1"] = profile_top(lambda: write_items(
            make_store(workdir / "profile.zarr", manifest, "digits_cnn", cfg, aug), source, teacher, items,
            cfg, aug, norm=norm, device=dev, progress=False))
    return point


def imagenet_bytes(workdir: Path, codecs: Sequence[str], shard_sizes: Sequence[int], topk: int,
                   samples: int = 2048) -> dict[str, Any]:
    """Per codec and shard size: measured bytes per sample-view at C=1000 and the writer's rate."""
    out: dict[str, Any] = {}
    for codec in codecs:
        for shard in shard_sizes:
            timings: dict[str, float] = {}
            store, _, _ = build_synthetic_store(workdir / f"in-{codec}-{shard}.zarr", num_classes=1000,
                                                codec=codec, samples=samples, views=1, shard_size=shard,
                                                topk=topk, timings=timings)
            out.setdefault(codec, {})[shard] = {**payload_bytes(store),
                                                "writer_sample_views_per_s": samples / sum(timings.values())}
    return out


def extrapolate(measured: dict[str, Any], *, views_list: Sequence[int], topk: int,
                stage1_slope: float | None) -> list[dict[str, Any]]:
    rows = []
    for codec, by_shard in measured.items():
        n_arrays = len(make_codec(codec, topk=topk).fields(1000)) + 2  # + params + done marker
        for shard, m in by_shard.items():
            per_sv = m["disk_bytes_per_sample_view"] + m["params_bytes_per_sample_view"]
            for v in views_list:
                sv = IMAGENET_TRAIN * v
                row = {"codec": codec, "shard_size": shard, "views": v, "cache_gb": sv * per_sv / 1e9,
                       "allocated_gb": sv * (m["allocated_bytes_per_sample_view"]
                                             + m["params_allocated_bytes_per_sample_view"]) / 1e9,
                       "files": v * math.ceil(IMAGENET_TRAIN / shard) * n_arrays,
                       "naive_digits_slope_hours": None if stage1_slope is None else sv * stage1_slope / 3600}
                for name, (dec, fwd) in SCENARIOS.items():
                    rates = {"decode": DESIGN_RATES[dec], "teacher": DESIGN_RATES[fwd],
                             "writer": m["writer_sample_views_per_s"]}
                    limit = min(rates, key=rates.__getitem__)
                    row[f"{name}_hours"] = sv / rates[limit] / 3600
                    row[f"{name}_bottleneck"] = limit
                rows.append(row)
    return rows


def run(*, device: str = "cpu", samples: Sequence[int] = (340, 680, 1347), views: Sequence[int] = (1, 2, 4),
        base_views: int = 2, codec: str = "fp16", shard_size: int = 128, workers: int = 0, batch: int = 64,
        rounds: int = 3, imagenet_codecs: Sequence[str] = CODEC_NAMES,
        imagenet_views: Sequence[int] = (10, 100), imagenet_shard_sizes: Sequence[int] = (128, 1024),
        imagenet_samples: int = 2048, topk: int = 20, precision: str | None = None,
        threads: int | None = None, profile: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    dev, precision = prepare_run(device, threads, precision)
    accelerator = bench_accelerator(dev, precision)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=workdir))
    try:
        kw = dict(codec=codec, shard_size=shard_size, workers=workers, batch=batch, rounds=rounds,
                  accelerator=accelerator, precision=precision)
        by_n = [measure_point(tmp, samples=n, views=base_views, **kw) for n in samples]
        by_v = [measure_point(tmp, samples=max(samples), views=v, profile=profile and v == views[-1], **kw)
                for v in views]
        fits = {f"{y}_vs_{x}": linear_fit([p[x] for p in pts], [p[y] for p in pts])
                for y in ("stage1_s", "stage2_epoch_s") for x, pts in (("samples", by_n), ("views", by_v))}
        fits["stage1_s_vs_sample_views"] = linear_fit([p["sample_views"] for p in by_n + by_v],
                                                      [p["stage1_s"] for p in by_n + by_v])
        measured = imagenet_bytes(tmp, imagenet_codecs, imagenet_shard_sizes, topk, imagenet_samples)
        rows = extrapolate(measured, views_list=imagenet_views, topk=topk,
                           stage1_slope=fits["stage1_s_vs_sample_views"]["slope"])
        payload: dict[str, Any] = {
            "benchmark": NAME, "machine": machine_info(dev),
            "config": {"dataset": "digits", "teacher": "digits_cnn", "student": "digits_mlp (aekt, cached)",
                       "codec": codec, "shard_size": shard_size, "workers": workers, "batch": batch,
                       "rounds": rounds, "precision": precision, "base_views": base_views},
            "by_samples": by_n, "by_views": by_v, "fits": fits,
            "imagenet": {"train_images": IMAGENET_TRAIN, "num_classes": 1000, "topk": topk,
                         "design_rates_img_per_s": DESIGN_RATES, "design_rates_source": DESIGN_SOURCE,
                         "assumptions": ASSUMPTIONS, "measured_c1000": measured, "extrapolated": rows}}
        return payload
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(p: dict[str, Any]) -> str:
    pts = [[x["samples"], x["views"], x["stage1_s"], x["stage2_epoch_s"], x["loader_epoch_s"]]
           for x in p["by_samples"] + p["by_views"]]
    fits = [[k, f["slope"], f["intercept"], f["r2"]] for k, f in p["fits"].items()]
    ext = [[r["codec"], r["shard_size"], r["views"], r["cache_gb"], r["allocated_gb"], r["files"],
            r["cpu_decode+resnet50_hours"], r["gpu_decode+resnet50_hours"],
            r["gpu_decode+resnet50_bottleneck"]] for r in p["imagenet"]["extrapolated"]]
    return "\n\n".join([
        f"scaling on {p['machine']['device_name']} (digits, seconds, median of {p['config']['rounds']})\n"
        + format_table(["N", "V", "stage1 s", "stage2 epoch s", "loader s"], pts),
        "linear fits (seconds = intercept + slope * x)\n"
        + format_table(["fit", "slope", "intercept", "R2"], fits),
        "ImageNet extrapolation (1.28M images; stage-1 hours from DESIGN.md's H100 rates + our writer rate)\n"
        + format_table(["codec", "shard", "V", "cache GB", "alloc GB", "files", "h cpu-dec", "h gpu-dec",
                        "gpu-dec limit"], ext)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--samples", type=csv_ints, default=[340, 680, 1347], help="digits N (max 1347)")
    parser.add_argument("--views", type=csv_ints, default=[1, 2, 4])
    parser.add_argument("--codec", default="fp16")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64, help="student batch for stage 2")
    parser.add_argument("--imagenet-codecs", type=csv_strs, default=list(CODEC_NAMES))
    parser.add_argument("--imagenet-shard-sizes", type=csv_ints, default=[128, 1024])
    parser.add_argument("--imagenet-samples", type=int, default=2048, help="rows of the C=1000 stores")
    args = parser.parse_args(argv)
    payload = run(device=args.device, samples=args.samples, views=args.views, codec=args.codec,
                  workers=args.workers, batch=args.batch, rounds=args.rounds,
                  imagenet_codecs=args.imagenet_codecs, imagenet_shard_sizes=args.imagenet_shard_sizes,
                  imagenet_samples=args.imagenet_samples, precision=args.precision, threads=args.threads,
                  profile=args.profile)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
