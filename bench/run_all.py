"""Run every benchmark with the sizes that suit the device, then print the headline ratios vs targets.

This is the one prepared script a GPU session runs (``python -m bench.run_all --device cuda``);
``--quick`` runs tiny sizes first to check the path end to end in under a minute. A benchmark that
fails is reported and the others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import BENCHMARKS, cache_read, decode, loader, object_store, precision, scaling, stage1, student_step
from bench.common import RESULTS_DIR

MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "student_step": student_step.main, "stage1": stage1.main, "cache_read": cache_read.main,
    "scaling": scaling.main, "object_store": object_store.main, "loader": loader.main,
    "precision": precision.main, "decode": decode.main}

# Extra arguments per (benchmark, device type); each module's own defaults cover the rest.
FULL: dict[tuple[str, str], list[str]] = {
    ("student_step", "cpu"): [], ("stage1", "cpu"): [], ("cache_read", "cpu"): [],
    ("scaling", "cpu"): [],
    ("student_step", "cuda"): ["--pairs", "digits,cifar", "--rounds", "5"],
    ("stage1", "cuda"): ["--dataset", "cifar10", "--samples", "20000", "--shard-size", "1000",
                         "--batch", "1024", "--workers", "8"],
    ("cache_read", "cuda"): ["--samples", "8192"],
    ("scaling", "cuda"): ["--workers", "4"],
    ("object_store", "cpu"): [], ("object_store", "cuda"): [],  # storage, not the device
    ("loader", "cpu"): [], ("precision", "cpu"): [], ("decode", "cpu"): [],
    # issue 20's GPU rows: epoch vs the student_step ceiling at 64/256/1024 (real CIFAR-10 JPEGs, which
    # must be on the machine: ../shared/data/cifar10-images), teacher precision, batched nvJPEG
    ("loader", "cuda"): ["--samples", "20000", "--shard-size", "1000", "--batch", "256",
                         "--epoch-batches", "64,256,1024", "--workers", "8", "--rounds", "2"],
    ("precision", "cuda"): ["--samples", "2000", "--batch", "1024"],
    ("decode", "cuda"): ["--images", "623", "--batch", "256"],
}
QUICK: dict[str, list[str]] = {
    "student_step": ["--pairs", "digits,cifar", "--batch", "8", "--steps", "1", "--warmup", "1",
                     "--rounds", "1"],
    "stage1": ["--samples", "100", "--views", "1", "--rounds", "1"],
    "cache_read": ["--classes", "10,100", "--samples", "256", "--views", "1", "--batch", "4", "--steps", "1",
                   "--rounds", "1"],
    "scaling": ["--samples", "50,100", "--views", "1,2", "--rounds", "1", "--imagenet-codecs", "fp16,topk",
                "--imagenet-samples", "512"],
    "object_store": ["--samples", "100", "--views", "1", "--rounds", "1"],
    "loader": ["--samples", "100", "--shard-size", "25", "--batch", "16", "--epoch-batches", "16", "--rounds", "1"],
    "precision": ["--archs", "resnet20_a", "--samples", "16", "--views", "1", "--rounds", "1"],
    "decode": ["--quick"],
}


def headlines(name: str, payload: dict[str, Any]) -> list[str]:
    """One line per measured ratio that has a target (values only: targets are for GPU runs)."""
    if name == "student_step":
        return [f"{r['teacher']}->{r['student']} b{r['batch']} {r['data_on']}: cached/CE "
                f"{r['ratios']['cached_over_ce']:.2f} (target >= 0.9), cached/online "
                f"{r['ratios']['cached_over_online']:.2f} (target >= 1.5)" for r in payload["results"]]
    if name == "stage1":
        return [f"{payload['config']['dataset']} {c}: stage1/forward-only "
                f"{r['ratio_to_forward_only']['median']:.2f} (target >= 0.8)"
                for c, r in payload["codecs"].items()]
    if name == "cache_read":
        return [f"C={case['num_classes']} {r['codec']} shard {r['shard_size']}: read/consumption "
                f"{r['read_over_consumption']:.1f} (target >= 20)" for case in payload["cases"]
                for r in case["results"]]
    if name == "loader":
        r = payload["loader_ratios"]["raw_batch_over_jpg_sample"]["median"]
        return [f"loader raw+batch / jpg+per-sample {r:.2f} per process (target >= 5)"] + [
            f"epoch / step ceiling b{e['batch']} {e['epoch_over_step']['median']:.2f} (target >= 0.8 on a GPU)"
            for e in payload["epoch_vs_step"]]
    if name == "precision":
        return [f"{r['arch']} {r['precision']}: KL1 max {r['kl_tau1_max']:.3g} (stated bound "
                f"{r['stated_kl_tolerance']}), speed/fp32 {r['speed_over_fp32']['median']:.2f}"
                for r in payload["results"]]
    if name in ("decode", "object_store"):
        return [f"{k}: {v['median']:.3g}" for k, v in payload["ratios"].items()]
    fit = payload["fits"]["stage1_s_vs_sample_views"]
    return [f"stage-1 seconds per sample-view (digits, this machine): {fit['slope']}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aekt bench all", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every path")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    parser.add_argument("--out-dir", type=Path, default=None, help=f"JSON folder (default {RESULTS_DIR})")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    device_type = args.device.split(":")[0]
    out_dir = args.out_dir or RESULTS_DIR
    failed, summary = [], []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in MAINS:
            parser.error(f"unknown benchmark {name!r}; valid: {', '.join(MAINS)}")
        extra = QUICK[name] if args.quick else FULL[(name, device_type)]
        bench_argv = ["--device", args.device, "--out-dir", str(out_dir), *extra]
        bench_argv += ["--profile"] if args.profile else []
        print(f"\n=== {name} {' '.join(bench_argv)}", flush=True)
        try:
            MAINS[name](bench_argv)
            payload = json.loads((out_dir / f"{name}-{device_type}.json").read_text())
            summary += [f"{name}: {line}" for line in headlines(name, payload)]
        except Exception:  # keep going: one broken benchmark should not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
    print("\n=== headline ratios (measured values; the targets apply to GPU runs)")
    print("\n".join(summary))
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
