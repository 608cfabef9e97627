"""Cache-read throughput vs student consumption, bytes on disk and fidelity, per codec and class count.

For C in {10, 100, 1000} a store of synthetic logits is written per codec; then, interleaved per
round: ``LogitStore.read_row`` over every (view, shard) as the stage-2 stream does (Zarr fetch +
decode + finiteness check), the fetch and the decode alone, and the student's cached-KD train step
(``bench.student_step``: digits_mlp, resnet8x4 at 32 px, resnet18 at 224 px). The ratio read/step is
how many times faster logits arrive than the student eats them (target >= 20).

Synthetic logits ("class-structured Gaussian"): a fixed random prototype row per class
(N(0, 1.5^2) off the diagonal) plus per-sample noise N(0, 1), with the target logit raised by a
margin calibrated so the mean softmax probability of the target is 0.8, a typical trained teacher's
confidence on its training set. Fidelity is the KL of decoded vs original at tau 1 and 4
(``pipeline.cache.verify.kl_at``). Usage::

    python -m bench.cache_read                      # CPU, C = 10, 100, 1000, ~1-2 min
    python -m bench.cache_read --device cuda --samples 8192
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    base_parser,
    csv_ints,
    csv_strs,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    paired_ratio,
    prepare_run,
    profile_top,
    summary,
)
from bench.student_step import DEFAULTS, PAIRS, StepRig, bench_accelerator
from pipeline import augment
from pipeline.cache.codecs import CODEC_NAMES
from pipeline.cache.store import LogitStore, Provenance
from pipeline.cache.verify import kl_at

NAME = "cache_read"
TARGET = {"read_over_consumption": 20.0}
PAIR_BY_CLASSES = {10: "digits", 100: "cifar", 1000: "imagenet"}
TARGET_PROB = 0.8


def synthetic_logits(rng: np.random.Generator, n: int, num_classes: int, *, prototypes: np.ndarray,
                     margin: float, targets: np.ndarray) -> np.ndarray:
    """float32 ``[n, C]``: prototype of the target class + N(0, 1) noise + margin on the target."""
    z = prototypes[targets] + rng.normal(0.0, 1.0, (n, num_classes))
    z[np.arange(n), targets] += margin
    return z.astype(np.float32)


def calibrate_margin(rng: np.random.Generator, num_classes: int, prototypes: np.ndarray,
                     target_prob: float = TARGET_PROB) -> float:
    """Bisect the margin so the mean target probability at tau=1 is ``target_prob``."""
    y = rng.integers(0, num_classes, 512)
    noise = prototypes[y] + rng.normal(0.0, 1.0, (512, num_classes))
    lo, hi = 0.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        z = noise.copy()
        z[np.arange(512), y] += mid
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        prob = (p[np.arange(512), y] / p.sum(axis=1)).mean()
        lo, hi = (mid, hi) if prob < target_prob else (lo, mid)
    return (lo + hi) / 2


def build_synthetic_store(path: Path, *, num_classes: int, codec: str, samples: int, views: int,
                          shard_size: int, topk: int = 20, seed: int = 0, compressor: str = "zstd",
                          clevel: int = 3, timings: dict[str, float] | None = None,
                          ) -> tuple[LogitStore, list[np.ndarray], np.ndarray]:
    """Write a complete store of synthetic logits; returns (store, original logits per view, targets).

    ``timings`` (if given) receives the seconds spent in ``encode`` and in ``write`` (write_row +
    mark_done): stage 1's writer-thread work for these logits."""
    rng = np.random.default_rng(seed)
    recipe = augment.recipe_info(PAIRS[PAIR_BY_CLASSES[num_classes]].recipe)
    prototypes = rng.normal(0.0, 1.5, (num_classes, num_classes))
    np.fill_diagonal(prototypes, 0.0)
    margin = calibrate_margin(rng, num_classes, prototypes)
    targets = rng.integers(0, num_classes, samples)
    prov = Provenance(
        dataset=f"synthetic-c{num_classes}", manifest_sha256="synthetic",
        teacher_arch="synthetic-gaussian", teacher_sha256="synthetic", teacher_precision="no",
            teacher_input_norm={"mean": list(recipe.mean), "std": list(recipe.std)},
        recipe=recipe.name, augment_seed=seed,
        image_size=PAIRS[PAIR_BY_CLASSES[num_classes]].size, views=views, codec=codec,
        codec_params={"k": topk} if codec == "topk" else {}, num_classes=num_classes,
        num_samples=samples, shard_size=shard_size, num_params=recipe.num_params)
    store = LogitStore.create(path, prov, compressor=compressor, clevel=clevel)
    originals = []
    for v in range(views):
        logits = synthetic_logits(rng, samples, num_classes, prototypes=prototypes, margin=margin,
                                  targets=targets)
        params = augment.sample_params(recipe.name, seed=seed, view=v, indices=np.arange(samples))
        for s in range(prov.num_shards):
            a, b = prov.shard_range(s)
            t0 = time.perf_counter()
            arrays = store.codec.encode(logits[a:b], targets[a:b])
            t1 = time.perf_counter()
            store.write_row(v, s, arrays, params[a:b])
            store.mark_done(v, s)
            if timings is not None:
                timings["encode"] = timings.get("encode", 0.0) + t1 - t0
                timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t1
        originals.append(logits)
    return store, originals, targets


def allocated_bytes(store: LogitStore, arrays: Sequence[str]) -> int:
    """Filesystem blocks the arrays occupy (what ``du`` says): a small chunk file still fills a block."""
    return sum(f.stat().st_blocks * 512 for name in arrays for f in (store.path / name).rglob("*")
               if f.is_file())


def payload_bytes(store: LogitStore) -> dict[str, float]:
    """Bytes per sample-view: logits payload on disk (LogitStore.disk_bytes, params and done markers
    excluded), params, the raw codec size, and the payload's allocated filesystem blocks."""
    disk, prov = store.disk_bytes(), store.provenance
    rows = prov.views * prov.num_samples
    names = [k for k in disk if k not in ("params", "done")]
    payload = sum(disk[k] for k in names)
    return {"disk_bytes_per_sample_view": payload / rows,
            "allocated_bytes_per_sample_view": allocated_bytes(store, names) / rows,
            "params_allocated_bytes_per_sample_view": allocated_bytes(store, ["params"]) / rows,
            "params_bytes_per_sample_view": disk.get("params", 0) / rows,
            "raw_bytes_per_sample_view": float(store.codec.raw_bytes_per_row(prov.num_classes))}


def _rows(store: LogitStore) -> list[tuple[int, int, int, int]]:
    prov = store.provenance
    return [(v, s, *prov.shard_range(s)) for v in range(prov.views) for s in range(prov.num_shards)]


def read_all(store: LogitStore, targets: np.ndarray) -> int:
    for v, s, a, b in _rows(store):
        store.read_row(v, s, targets[a:b])
    return sample_views(store)


def sample_views(store: LogitStore) -> int:
    return store.provenance.views * store.provenance.num_samples


def fetch_all(store: LogitStore) -> list[dict[str, np.ndarray]]:
    names = list(store.codec.fields(store.provenance.num_classes)) + ["params"]
    return [{n: store.group[n][v, a:b] for n in names} for v, s, a, b in _rows(store)]


def decode_all(store: LogitStore, fetched: list[dict[str, np.ndarray]], targets: np.ndarray) -> int:
    for (_, _, a, b), arrays in zip(_rows(store), fetched, strict=True):
        logits = store.codec.decode(arrays, store.provenance.num_classes, targets[a:b])
        np.isfinite(logits).all()
    return sample_views(store)


def fidelity(store: LogitStore, originals: list[np.ndarray], targets: np.ndarray) -> dict[str, float]:
    got = np.concatenate([store.read_row(v, s, targets[a:b])[0] for v, s, a, b in _rows(store)])
    ref = np.concatenate(originals)  # rows in the same (view, sample) order as _rows
    kl1, kl4 = kl_at(ref, got, 1.0), kl_at(ref, got, 4.0)
    return {"kl_tau1_mean": float(kl1.mean()), "kl_tau1_max": float(kl1.max()),
            "kl_tau4_mean": float(kl4.mean()), "kl_tau4_max": float(kl4.max()),
            "max_abs_logit_error": float(np.abs(ref - got).max())}


def run_case(num_classes: int, *, codecs: Sequence[str], samples: int, views: int,
             shard_sizes: Sequence[int], topk: int, rounds: int, accelerator: Any, batch: int | None,
             steps: int | None, profile: bool, workdir: Path) -> dict[str, Any]:
    pair = PAIRS[PAIR_BY_CLASSES[num_classes]]
    d_batches, d_steps, d_warmup = DEFAULTS[(pair.name, accelerator.device.type)]
    keys = [(c, n) for c in codecs for n in shard_sizes]
    # The same seed gives the same logits for every codec and shard size.
    stores = {(c, n): build_synthetic_store(workdir / f"c{num_classes}-{c}-{n}.zarr", num_classes=num_classes,
                                            codec=c, samples=samples, views=views, shard_size=n, topk=topk)
              for c, n in keys}
    readers = {k: LogitStore.open(stores[k][0].path) for k in keys}  # a stream worker's handle
    targets = stores[keys[0]][2]
    rig = StepRig(pair, batch=batch or d_batches[0], accelerator=accelerator, pool=2,
                  modes=("cached_kd",))
    rig.run("cached_kd", d_warmup)
    cases = {"student": functools.partial(rig.run, "cached_kd", d_steps if steps is None else steps)}
    for k in keys:
        cases[f"read_row/{k}"] = functools.partial(read_all, readers[k], targets)
        cases[f"fetch/{k}"] = functools.partial(lambda st: fetch_all(st) and sample_views(st), readers[k])
        cases[f"decode/{k}"] = functools.partial(decode_all, readers[k], fetch_all(readers[k]), targets)
        read_all(readers[k], targets)  # warm the page cache and zarr's metadata
    # The student's step runs in the same rounds as the reads: the ratio is measured side by side.
    rates = interleaved(cases, rounds=rounds, device=accelerator.device)
    eat = rates["student"]
    fid = {c: fidelity(readers[(c, shard_sizes[0])], stores[(c, shard_sizes[0])][1], targets) for c in codecs}
    results = []
    for c, n in keys:
        read = rates[f"read_row/{(c, n)}"]
        results.append({
            "codec": c, "shard_size": n, "read_row_sample_views_per_s": summary(read)["median"],
            "read_rounds": read, "fetch_sample_views_per_s": summary(rates[f"fetch/{(c, n)}"])["median"],
            "decode_sample_views_per_s": summary(rates[f"decode/{(c, n)}"])["median"],
            "read_over_consumption": paired_ratio(read, eat)["median"],
            **payload_bytes(stores[(c, n)][0]), **fid[c]})
    out: dict[str, Any] = {"num_classes": num_classes, "student": pair.student,
                           "student_batch": rig.batch, "student_img_per_s": summary(eat)["median"],
                           "student_rounds": eat, "results": results}
    if profile:
        out["profile_read_row"] = profile_top(lambda: read_all(readers[keys[0]], targets))
    return out


def run(*, device: str = "cpu", classes: Sequence[int] = (10, 100, 1000),
        codecs: Sequence[str] = CODEC_NAMES, samples: int = 4096, views: int = 2,
        shard_sizes: Sequence[int] = (128, 1024), topk: int = 20, rounds: int = 3,
        batch: int | None = None, steps: int | None = None, precision: str | None = None,
        threads: int | None = None, profile: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    dev, precision = prepare_run(device, threads, precision)
    accelerator = bench_accelerator(dev, precision)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-read-", dir=workdir))
    try:
        cases = [run_case(c, codecs=codecs, samples=samples, views=views, shard_sizes=shard_sizes,
                          topk=min(topk, c // 2), rounds=rounds, accelerator=accelerator, batch=batch,
                          steps=steps, profile=profile, workdir=tmp) for c in classes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": NAME, "machine": machine_info(dev),
            "config": {"samples": samples, "views": views, "shard_sizes": list(shard_sizes), "topk": topk,
                       "topk_note": "k = min(topk, C/2) so the tail path is exercised at C=10",
                       "compressor": "zstd", "clevel": 3, "precision": precision, "rounds": rounds,
                       "logits": "class-structured Gaussian, margin calibrated to a mean target "
                                 f"probability of {TARGET_PROB}"},
            "targets": TARGET, "cases": cases}


def table(p: dict[str, Any]) -> str:
    rows = []
    for case in p["cases"]:
        for r in case["results"]:
            rows.append([case["num_classes"], r["codec"], r["shard_size"], r["read_row_sample_views_per_s"],
                         r["fetch_sample_views_per_s"], r["decode_sample_views_per_s"],
                         case["student_img_per_s"], r["read_over_consumption"],
                         r["disk_bytes_per_sample_view"], r["raw_bytes_per_sample_view"], r["kl_tau1_mean"],
                         r["kl_tau1_max"], r["kl_tau4_mean"]])
    head = ["C", "codec", "shard", "read_row/s", "fetch/s", "decode/s", "student/s", "read/eat", "B/sv disk",
            "B/sv raw", "KL1 mean", "KL1 max", "KL4 mean"]
    return (f"cache_read on {p['machine']['device_name']} (sample-views/s, median of {p['config']['rounds']} "
            "rounds; target read/eat >= 20)\n" + format_table(head, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--classes", type=csv_ints, default=[10, 100, 1000], help="of 10,100,1000")
    parser.add_argument("--codecs", type=csv_strs, default=list(CODEC_NAMES))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--shard-sizes", type=csv_ints, default=[128, 1024],
                        help="chunk rows (data.shard_size) to compare")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="student batch (default per pair and device)")
    parser.add_argument("--steps", type=int, default=None, help="student steps per round")
    args = parser.parse_args(argv)
    payload = run(device=args.device, classes=args.classes, codecs=args.codecs, samples=args.samples,
                  views=args.views, shard_sizes=args.shard_sizes, topk=args.topk, rounds=args.rounds,
                  batch=args.batch, steps=args.steps, precision=args.precision, threads=args.threads,
                  profile=args.profile)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
