"""Issue 11: does AEKT beat KD and DKD here? Every method × seeds from ONE teacher-logit cache.

    python -m experiments.run                      # digits, 5 seeds, 40 epochs -> docs/results.md
    python -m experiments.run --quick --workdir W  # 1 seed, 2 epochs, 4 methods: a smoke run

Stage 1 (prepare, teacher, cache) runs once, in-process through the same library functions the
`aekt` stages call, in ``--workdir``; every student cell then calls ``train_student`` on that one
store. Cells run seed-major (all methods for seed 0, then seed 1, ...) so a cut-short run still has
paired seeds. Nothing is tuned: every value is params.yaml's default or a published recipe. The
report (tables, statistics, plot) is written by ``experiments.report`` from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from experiments import report
from experiments.stats import history_columns, set_flags
from pipeline.cache.build import build_cache
from pipeline.config import LossConfig, TrainConfig, load_params, section
from pipeline.data import Manifest, prepare
from pipeline.student import StudentPaths, train_student
from pipeline.teacher import run_teacher

REPO = Path(__file__).resolve().parents[1]

# label -> (group, loss overrides on top of params.yaml `loss:`). Baselines build no head
# (pipeline.student.build_student); "aekt*" cells are the default and one switch flipped at a time.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("baseline", {"name": "ce"}),
    "kd": ("baseline", {"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9}),  # the published recipe
    "kd_ce1_kd1": ("baseline", {"name": "kd", "ce_weight": 1.0, "kd_weight": 1.0}),
    "dkd": ("baseline", {"name": "dkd"}),  # alpha 1, beta 8, tau 4 (params.yaml)
    "nkd": ("baseline", {"name": "nkd"}),  # gamma 1, tau 4 (params.yaml, not tuned)
    "dist": ("baseline", {"name": "dist"}),  # dist_beta 2, dist_gamma 2: DIST's CIFAR setting (params.yaml)
    "aekt": ("aekt", {"name": "aekt"}),  # adaptive ratio, explicit binary_kl, head serial
    "aekt_adaptive_none": ("ablation", {"name": "aekt", "adaptive": "none"}),  # = DKD + serial head
    "aekt_explicit_nkd": ("ablation", {"name": "aekt", "explicit": "nkd"}),
    "aekt_head_parallel": ("ablation", {"name": "aekt", "head": "parallel"}),
    "aekt_head_none": ("ablation", {"name": "aekt", "head": "none"}),
    "aekt_adaptive_none_head_none": ("ablation", {"name": "aekt", "adaptive": "none", "head": "none"}),
}
# Control, decided before any result: DKD with alpha = AEKT's mean w (train-set statistic of the
# head=none AEKT cells). If it matches AEKT, w acts as a global rescale of TCKD, not per sample.
CONTROL, CONTROL_SOURCE = "dkd_alpha_mean_w", "aekt_head_none"
PROBED = ("dkd", "aekt", "aekt_head_none", "aekt_adaptive_none")  # per-term gradient norms
QUICK_METHODS = ("ce", "dkd", "aekt", "aekt_adaptive_none_head_none")
# A tiny digits pipeline for --quick: ~100 train samples, 2 views, a 2-epoch teacher.
QUICK_PARAMS = {"data": {"max_per_class": 10, "shard_size": 32}, "augment": {"views": 2},
                "teacher": {"epochs": 2}, "train": {"epochs": 2}, "loss": {"warmup_epochs": 1}}
# Real CIFAR-10 JPEGs cut to CPU size: 100 images per class per split, resnet20 -> resnet8, 15 epochs
# each (the 240-epoch recipe's lr and milestones scaled to 15 epochs; warm-up 2 epochs).
CIFAR10_TINY = {
    "data": {"source": "folder", "name": "cifar10-tiny", "root": str(REPO.parent / "shared/data/cifar10-images"),
             "max_per_class": 100, "shard_size": 100},
    "augment": {"recipe": "cifar", "size": 32, "views": 8},
    "teacher": {"arch": "resnet20", "epochs": 15, "lr": 0.05, "lr_schedule": "cosine"},
    "student": {"arch": "resnet8"}, "loss": {"warmup_epochs": 2},
    # The CIFAR KD recipe (batch 64, lr 0.05, x0.1 at .625/.75/.875 of the run) at 15 epochs.
    "train": {"epochs": 15, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-4, "lr_schedule": "multistep",
              "milestones": [0.625, 0.75, 0.875], "lr_gamma": 0.1}}
DATASETS: dict[str, tuple[dict[str, dict[str, Any]], tuple[str, ...], int]] = {  # overrides, methods, seeds
    "digits": ({}, tuple(METHODS), 5), "cifar10": (CIFAR10_TINY, ("ce", "kd", "dkd", "aekt"), 3)}


def merged_params(overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = load_params(REPO / "params.yaml")
    for name, values in overrides.items():
        params.setdefault(name, {}).update(values)
    return params


def build_stage1(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """prepare + teacher + cache, once, in ``work`` (the paths dvc.yaml uses)."""
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data, teacher, cache, aug = (section(params, n) for n in ("data", "teacher", "cache", "augment"))
    manifest, shards = work / f"manifests/{data.name}.json", work / "data/shards"
    store, model = work / f"cache/{data.name}-{teacher.arch}.zarr", work / "models/teacher.safetensors"
    start = time.perf_counter()
    prepare(data, shards_dir=shards, manifest_path=manifest, progress=False)
    tmetrics = run_teacher(manifest_path=manifest, shards_dir=shards, model_out=model,
                           metrics_path=work / "metrics/teacher.json", history_path=work / "plots/teacher.csv",
                           cfg=teacher, aug=aug, progress=False)
    summary = build_cache(manifest_path=manifest, shards_dir=shards, teacher_path=model, store_path=store,
                          cfg=cache, aug=aug, rebuild=True, progress=False)
    counts = {k: v.num_samples for k, v in Manifest.load(manifest).splits.items()}
    return {"manifest": str(manifest), "shards_dir": str(shards), "store": str(store), "teacher": str(model),
            "teacher_top1": tmetrics["test_top1"], "teacher_arch": teacher.arch, "samples": counts,
            "cache_items": summary["items_total"], "seconds": time.perf_counter() - start}


def cell_configs(params: dict[str, Any], overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    loss = LossConfig.from_params({**params.get("loss", {}), **overrides})
    train = TrainConfig.from_params({**params.get("train", {}), "seed": seed})
    return {"student": section(params, "student"), "loss": loss, "train": train,
            "cache": section(params, "cache"), "aug": section(params, "augment")}


def run_cell(work: Path, stage1: dict[str, Any], params: dict[str, Any], label: str,
             overrides: dict[str, Any], seed: int, keep_checkpoint: bool) -> dict[str, Any]:
    cfg = cell_configs(params, overrides, seed)
    if keep_checkpoint:  # the final full state (head included) for the gradient probe
        cfg["train"] = replace(cfg["train"], checkpoint_every=cfg["train"].epochs)
    out = work / "runs" / label / f"seed{seed}"
    paths = StudentPaths(manifest=Path(stage1["manifest"]), shards_dir=Path(stage1["shards_dir"]),
                         teacher=Path(stage1["teacher"]), store=Path(stage1["store"]),
                         model_out=out / "student.safetensors", metrics=out / "student.json",
                         history=out / "train.csv", ckpt_dir=out / "ckpt")
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = train_student(paths, progress=False, **cfg)
    history = history_columns(paths.history.read_text())
    return {"method": label, "seed": seed, "final_top1": metrics["final_top1"],
            "best_top1": metrics["best_top1"], "best_epoch": metrics["best_epoch"],
            "epochs": metrics["epochs"], "final_terms": {k: v[-1] for k, v in history.items()
                                                         if k.startswith(("loss_", "stat_", "grad_"))},
            "history": history,
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "checkpoint": str(out / "ckpt") if keep_checkpoint else None}


def dvc_exp_check(work: Path, overrides: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Reproduce the (dkd, seed) cell with `dvc exp run` in a fresh git copy of this working tree
    (stage 1 included: the copy has no dvc.lock), and return its metrics for comparison."""
    repo = work / "dvc-repo"
    shutil.rmtree(repo, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    skip = ("bench/results/", "docs/", "dvc.lock", "manifests/", "metrics/", "plots/")  # outputs of other runs
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith(skip):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    git = ["git", "-c", "user.email=exp@local", "-c", "user.name=exp"]
    flags = set_flags(overrides, present=load_params(REPO / "params.yaml"))
    command = f"dvc exp run -S loss.name=dkd -S train.seed={seed} {flags}".strip()
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    start = time.perf_counter()
    proc = subprocess.run(command.split(), cwd=repo, env=env, capture_output=True, text=True)
    attempt: dict[str, Any] = {"returncode": proc.returncode, "seconds": time.perf_counter() - start}
    if proc.returncode != 0:
        attempt["error"] = [ln for ln in proc.stderr.splitlines() if ln.startswith(("Error", "ERROR"))][-3:] \
            or [proc.stderr[-1000:]]
    else:
        metrics = json.loads((repo / "metrics/student.json").read_text())
        attempt.update(final_top1=metrics["final_top1"], best_top1=metrics["best_top1"],
                       teacher_top1=json.loads((repo / "metrics/teacher.json").read_text())["test_top1"])
    return {"command": command, "seed": seed, "attempts": [attempt]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny data, 2 epochs, 4 methods")
    parser.add_argument("--seeds", type=int, default=None, help="train.seed 0..N-1 (default 5; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs (default: recipe)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="digits")
    parser.add_argument("--workdir", type=Path, default=None, help="default /tmp/aekt-experiments-<dataset>")
    parser.add_argument("--json", type=Path, default=None, help="default bench/results/experiments-<dataset>.json")
    parser.add_argument("--doc", type=Path, default=REPO / "docs/results.md")
    parser.add_argument("--plot", type=Path, default=None, help="default docs/results-<data.name>.png")
    parser.add_argument("--no-dvc-check", action="store_true", help="skip the `dvc exp run` cell check")
    parser.add_argument("--report-only", action="store_true", help="re-render --doc/--plot from --json")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or Path(f"/tmp/aekt-experiments-{args.dataset}")
    args.json = args.json or REPO / f"bench/results/experiments-{args.dataset}.json"
    # Named after data.name (digits, cifar10-tiny): docs/results-cifar10.* belong to experiments/cifar10_gpu.py.
    plot_for = lambda params: args.plot or REPO / f"docs/results-{params['data']['name']}.png"  # noqa: E731
    if args.report_only:
        payload = json.loads(args.json.read_text())
        payload.pop("analysis", None)
        report.write_all(payload, json_path=args.json, doc_path=args.doc, plot_path=plot_for(payload["params"]))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # as the dvc stages under OMP_NUM_THREADS=1: same floats, fair on a shared CPU
    preset, default_methods, default_seeds = DATASETS[args.dataset]
    overrides = {k: dict(v) for k, v in (QUICK_PARAMS if args.quick else preset).items()}
    if args.epochs:
        overrides.setdefault("train", {})["epochs"] = args.epochs
    params = merged_params(overrides)
    methods = args.methods.split(",") if args.methods else list(QUICK_METHODS if args.quick else default_methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    seeds = range(args.seeds or (1 if args.quick else default_seeds))
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    started, cpu0 = time.time(), time.process_time()
    stage1 = build_stage1(args.workdir, params)
    print(f"stage 1: teacher top-1 {stage1['teacher_top1']:.4f}, {stage1['seconds']:.0f}s", flush=True)
    cells: list[dict[str, Any]] = []
    for seed in seeds:
        for label in methods:
            cells.append(run_cell(args.workdir, stage1, params, label, METHODS[label][1], seed,
                                  keep_checkpoint=seed == 0 and label in PROBED))
            print(f"{label} seed {seed}: final {cells[-1]['final_top1']:.4f} ({cells[-1]['cpu_s']:.0f}s cpu)",
                  flush=True)
    table, alpha = dict(METHODS), None
    if CONTROL_SOURCE in methods and not args.quick:
        w = [float(np.mean(c["history"]["stat_w_mean"])) for c in cells if c["method"] == CONTROL_SOURCE]
        alpha = round(sum(w) / len(w), 2)
        table[CONTROL] = ("control", {"name": "dkd", "alpha": alpha})
        for seed in seeds:
            cells.append(run_cell(args.workdir, stage1, params, CONTROL, table[CONTROL][1], seed, False))
            print(f"{CONTROL} (alpha {alpha}) seed {seed}: final {cells[-1]['final_top1']:.4f}", flush=True)
    probe = report.gradient_probe(stage1, params, cells, lambda m: cell_configs(params, table[m][1], 0), 256)
    check = not (args.no_dvc_check or args.quick) and args.dataset == "digits"  # the dvc copy runs digits
    dvc = dvc_exp_check(args.workdir, overrides, seed=min(1, seeds[-1])) if check else None
    payload = {"kind": "quick" if args.quick else "full", "dataset": args.dataset,
               "argv": list(argv if argv is not None else sys.argv[1:]),
               "params": params, "overrides": overrides, "stage1": stage1, "control_alpha": alpha,
               "methods": {m: {"group": g, "loss": cell_configs(params, o, 0)["loss"].to_dict(), "overrides": o}
                           for m, (g, o) in table.items() if m in {c["method"] for c in cells}},
               "cells": cells, "gradient_probe": probe, "dvc_exp_check": dvc,
               "machine": report.machine_info(), "started": started,
               "cpu_s_total": time.process_time() - cpu0 + report.children_cpu_s(),
               "wall_s_total": time.time() - started}
    report.write_all(payload, json_path=args.json, doc_path=args.doc, plot_path=plot_for(params))
    print(f"wrote {args.json}, {args.doc}, {plot_for(params)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
