"""DVC bookkeeping cost for the Zarr logit store: ``dvc repro`` / ``dvc status`` vs the store's file count.

In a temporary git + DVC repo, one stage whose cmd writes nothing declares a directory output
``persist: true, cache: false`` (as ``dvc.yaml`` declares the store). The directory is filled
with files laid out like the store, 3 per (view, shard): ``logits/c/v/s/0``, ``params/c/v/s/0``,
``done/c/v/s``. Per size: (1) cold ``dvc repro`` (first hash of every file, recorded in dvc.lock),
(2) ``dvc status`` with nothing changed (DVC's state db answers from mtime/inode/size), (3)
``dvc status`` after rewriting one chunk. File contents are small (``--file-bytes``) since the
file count drives the per-file cost; one extra case with ~2 MB logits chunks measures md5 bytes/s.
Files were just written, so they sit in the page cache: hashing from a cold disk is slower. Usage::

    python -m bench.dvc_bookkeeping                      # CPU, ~38k files at most, a few minutes
    python -m bench.dvc_bookkeeping --views 1,3 --big-shards 0
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import base_parser, csv_ints, finish, format_table, linear_fit, machine_info

DVC_YAML = """stages:
  cache:
    cmd: python -c "pass"
    outs:
      - store.zarr:
          persist: true
          cache: false
"""
IMAGENET_SHARDS = 1282  # 1.28M images in 1000-sample shards


def fill_store(root: Path, views: int, shards: int, logits_bytes: int, small_bytes: int) -> int:
    """Write the store's chunk files; returns the file count."""
    rng = np.random.default_rng(0)
    logits, small = rng.bytes(logits_bytes), rng.bytes(small_bytes)
    n = 0
    for v in range(views):
        for s in range(shards):
            for name, blob in (("logits", logits), ("params", small)):
                d = root / name / "c" / str(v) / str(s)
                d.mkdir(parents=True, exist_ok=True)
                (d / "0").write_bytes(f"{v},{s}".encode() + blob)
            d = root / "done" / "c" / str(v)
            d.mkdir(parents=True, exist_ok=True)
            (d / str(s)).write_bytes(b"\x01")
            n += 3
    return n


def dvc(repo: Path, *args: str) -> float:
    start = time.perf_counter()
    out = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return seconds


def measure(views: int, shards: int, logits_bytes: int, small_bytes: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dvc-bookkeeping-") as tmp:
        repo = Path(tmp)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                    ["dvc", "config", "core.analytics", "false"],
                    ["dvc", "config", "core.site_cache_dir", str(repo / ".site-cache")]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        (repo / "dvc.yaml").write_text(DVC_YAML)
        start = time.perf_counter()
        files = fill_store(repo / "store.zarr", views, shards, logits_bytes, small_bytes)
        fill_s = time.perf_counter() - start
        total_bytes = sum(p.stat().st_size for p in (repo / "store.zarr").rglob("*") if p.is_file())
        cold = dvc(repo, "repro")
        warm = [dvc(repo, "status") for _ in range(rounds)]
        touched = []
        for r in range(rounds):  # a fresh change every round: the state db has not seen it yet
            (repo / "store.zarr" / "logits" / "c" / "0" / str(r) / "0").write_bytes(os.urandom(small_bytes))
            touched.append(dvc(repo, "status"))
        repro_after_touch = dvc(repo, "repro")
        baseline = dvc(repo, "version")  # interpreter + import cost of any dvc call
    return {"views": views, "shards": shards, "files": files, "bytes": total_bytes, "fill_s": fill_s,
            "cold_repro_s": cold, "warm_status_s": float(np.median(warm)), "warm_status_rounds": warm,
            "touched_status_s": float(np.median(touched)), "touched_status_rounds": touched,
            "repro_after_touch_s": repro_after_touch, "dvc_version_s": baseline}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser("dvc_bookkeeping", __doc__.splitlines()[0])
    parser.add_argument("--views", type=csv_ints, default=[1, 3, 10], help="V per case (files = 3 V shards).")
    parser.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    parser.add_argument("--file-bytes", type=int, default=1024, help="size of every small-case file.")
    parser.add_argument("--big-shards", type=int, default=350, help="shards of the ~2 MB-logits case (0: skip).")
    parser.add_argument("--big-bytes", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    cases = [measure(v, args.shards, args.file_bytes, args.file_bytes, args.rounds) for v in args.views]
    fits = {k: linear_fit([c["files"] for c in cases], [c[k] for c in cases])
            for k in ("cold_repro_s", "warm_status_s", "touched_status_s")}
    target = 3 * 100 * IMAGENET_SHARDS  # V=100 ImageNet
    extrapolated: dict[str, Any] = {"files": target}
    for k, f in fits.items():
        extrapolated[k] = None if f["slope"] is None else f["intercept"] + f["slope"] * target
    big = None
    if args.big_shards:
        big = measure(1, args.big_shards, args.big_bytes, 20_000, args.rounds)
        fit = fits["cold_repro_s"]  # the per-file + fixed cost, from the small-file cases
        per_file = fit["slope"] if fit["slope"] is not None else cases[0]["cold_repro_s"] / cases[0]["files"]
        hash_s = big["cold_repro_s"] - (fit["intercept"] or 0.0) - per_file * big["files"]
        big["md5_mb_per_s"] = big["bytes"] / 1e6 / max(hash_s, 1e-9)
        # V=100 ImageNet: 128,200 logits chunks of ~2 MB (fp16, C=1000, 1000-row shards).
        extrapolated["cold_bytes_s"] = 100 * IMAGENET_SHARDS * 2.0e6 / 1e6 / big["md5_mb_per_s"]
    rows = [[c["files"], c["bytes"] / 1e6, c["cold_repro_s"], c["warm_status_s"], c["touched_status_s"],
             c["repro_after_touch_s"]] for c in cases + ([big] if big else [])]
    rows.append([target, 100 * IMAGENET_SHARDS * 2.02e6 / 1e6, extrapolated["cold_repro_s"],
                 extrapolated["warm_status_s"], extrapolated["touched_status_s"], "-"])
    table = format_table(["files", "MB", "cold repro s", "warm status s", "status after touch s",
                          "repro after touch s"], rows)
    table += ("\nlast row: linear fit over the small-file cases extrapolated to V=100 (cold excludes md5 of"
              f" 256 GB: +{extrapolated.get('cold_bytes_s', float('nan')):.0f} s at the measured md5 rate)")
    payload = {"benchmark": "dvc_bookkeeping", "machine": machine_info(device),
               "dvc": subprocess.run(["dvc", "--version"], capture_output=True, text=True).stdout.strip(),
               "config": vars(args) | {"out_dir": str(args.out_dir)}, "cases": cases, "big_files_case": big,
               "fits_seconds_per_file": fits, "extrapolated_imagenet_v100": extrapolated}
    finish(payload, table, name="dvc_bookkeeping", device=device, out_dir=args.out_dir, write=not args.no_write)


if __name__ == "__main__":
    main()
