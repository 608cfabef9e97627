"""Object storage vs local disk: the stage-2 loader and the stage-1 writer, side by side in one run.

A real ``prepare`` writes digits shards into a temporary folder and the same shards are uploaded to
an S3 bucket; a store of teacher-shaped logits is written on both. Interleaved per round:

* **loader**: one epoch of ``ShardStream(...).batched`` (shards read through webdataset's opener,
  sha256 checked as they stream, one logits chunk row per shard, decode + augmentation), with shards
  and store local vs on S3: samples/s and the ratio S3/local;
* **writer**: stage 1's writer-thread work for every (view, shard) row (``writer._finish_item``:
  labels, codec arrays, params, done marker) into a fresh store, local vs on S3: rows/s and the ratio.

The S3 server is moto on 127.0.0.1 started here (fake credentials; ``pip install -e ".[dev]"``), or
the endpoint in AWS_ENDPOINT_URL with ``--bucket`` (credentials from the environment). Loopback moto
has no network latency but a slow pure-Python server; a real bucket has the opposite: the ratio says
what the object-store code path costs, not what a given cloud will give. Usage::

    python -m bench.object_store                   # CPU, all digits (~1,350 train samples), ~1 min
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    base_parser,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    paired_ratio,
    prepare_run,
    summary,
)
from bench.stage1 import make_store, prepare_dataset
from pipeline import augment
from pipeline.cache.writer import _finish_item
from pipeline.config import AugmentConfig, CacheConfig
from pipeline.data import Manifest
from pipeline.data.location import Location, filesystem
from pipeline.stream import ShardStream, StreamSpec

NAME = "object_store"


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with fake credentials in this process's environment; yields a
    new bucket URL. The environment is restored on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(30)
    if starter.is_alive():
        raise SystemExit("the moto S3 server did not start within 30 s")
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench-fake-key", "AWS_SECRET_ACCESS_KEY": "bench-fake-secret",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        bucket = f"s3://aekt-bench-{uuid.uuid4().hex[:12]}"
        fs, path = filesystem(bucket)
        fs.mkdir(path)
        yield bucket
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload(folder: Path, url: str) -> None:
    fs, root = filesystem(url)
    for path in sorted(folder.iterdir()):
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def write_store(path: Location, manifest: Manifest, aug: AugmentConfig, logits: np.ndarray) -> int:
    """Stage 1's writer work for every (view, shard) row of a fresh store at ``path``; rows written."""
    store = make_store(path, manifest, "digits_cnn", CacheConfig(), aug)
    labels = np.array(logits.argmax(axis=1), dtype=np.int64)
    rows = 0
    for view in range(aug.views):
        params = augment.sample_params(aug.recipe, seed=aug.seed, view=view, indices=np.arange(len(logits)))
        for shard in range(store.provenance.num_shards):
            a, b = store.provenance.shard_range(shard)
            item = {"view": view, "shard": shard, "keys": [str(i) for i in range(a, b)],
                    "labels": labels[a:b], "params": params[a:b]}
            _finish_item(store, item, logits[a:b])
            rows += 1
    return rows


def read_epoch(spec: StreamSpec, batch: int) -> int:
    """Samples of one stage-2 epoch (batched stream, no DataLoader workers)."""
    return sum(len(b["label"]) for b in ShardStream(spec).batched(batch))


def run(*, device: str = "cpu", samples: int | None = None, shard_size: int = 128, views: int = 2,
        batch: int = 128, rounds: int = 3, threads: int | None = None, precision: str | None = None,
        bucket: str | None = None) -> dict[str, Any]:
    dev, _ = prepare_run(device, threads, precision)
    aug = AugmentConfig(recipe="digits", seed=0, views=views)
    with tempfile.TemporaryDirectory(prefix="aekt-bench-objstore-") as tmp, \
            (contextlib.nullcontext(bucket) if bucket else loopback_s3()) as url:
        work = Path(tmp)
        manifest, shards, manifest_path = prepare_dataset("digits", work, samples=samples, shard_size=shard_size)
        upload(shards, f"{url}/shards")
        n = manifest.splits["train"].num_samples
        logits = np.random.default_rng(0).normal(size=(n, manifest.num_classes)).astype(np.float32)
        write_store(work / "store.zarr", manifest, aug, logits)
        write_store(f"{url}/store.zarr", manifest, aug, logits)

        def spec(where: Location, store: Location) -> StreamSpec:
            return StreamSpec(manifest_path=manifest_path, shards_dir=where, split="train", recipe="digits",
                              image_size=8, aug_seed=0, views=views, store_path=store, batch_augment=True)

        local, remote = spec(shards, work / "store.zarr"), spec(f"{url}/shards", f"{url}/store.zarr")
        assert read_epoch(local, batch) == read_epoch(remote, batch) == n
        counter = iter(range(1 << 30))
        cases = {
            "loader_local": lambda: read_epoch(local, batch),
            "loader_s3": lambda: read_epoch(remote, batch),
            "writer_local": lambda: write_store(work / f"w{next(counter)}.zarr", manifest, aug, logits),
            "writer_s3": lambda: write_store(f"{url}/w{next(counter)}.zarr", manifest, aug, logits),
        }
        rates = interleaved(cases, rounds=rounds, device=dev)
    return {
        "benchmark": NAME, "machine": machine_info(dev),
        "config": {"dataset": "digits", "train_samples": n, "shard_size": shard_size, "views": views,
                   "batch": batch, "rounds": rounds, "s3": "moto on 127.0.0.1" if bucket is None else "given bucket"},
        "rates": {name: summary(values) for name, values in rates.items()},
        "ratios": {"loader_s3_over_local": paired_ratio(rates["loader_s3"], rates["loader_local"]),
                   "writer_s3_over_local": paired_ratio(rates["writer_s3"], rates["writer_local"])},
    }


def table(p: dict[str, Any]) -> str:
    r, q = p["rates"], p["ratios"]
    rows = [["stage-2 loader", "samples/s", r["loader_local"]["median"], r["loader_s3"]["median"],
             q["loader_s3_over_local"]["median"]],
            ["stage-1 writer", "rows/s", r["writer_local"]["median"], r["writer_s3"]["median"],
             q["writer_s3_over_local"]["median"]]]
    return format_table(["path", "unit", "local", "s3", "s3/local"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="training samples (default: all digits)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bucket", default=None,
                        help="s3://bucket/prefix to use instead of a loopback moto server (endpoint and "
                             "credentials from the environment)")
    args = parser.parse_args(argv)
    payload = run(device=args.device, samples=args.samples, shard_size=args.shard_size, views=args.views,
                  batch=args.batch, rounds=args.rounds, threads=args.threads, precision=args.precision,
                  bucket=args.bucket)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
