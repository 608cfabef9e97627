"""CIFAR-10 end to end on one machine, the script a GPU session runs: prepare -> teacher -> cache ->
student for CE, KD, DKD and AEKT on the full set, and the student's epoch time with cached logits
vs an online teacher, measured side by side in the same run (ABBA order, so drift cancels).

Every step is the real stage command (`aekt prepare|teacher|cache|student|verify-cache`, as
dvc.yaml runs them) in a work folder, with params from a preset plus this script's overrides; its
wall time includes interpreter start-up. The JSON is rewritten after every step, so a run cut
short by a time limit still leaves what it measured. docs/results-cifar10.md is rendered from the
JSON files of every run (``render``), GPU runs first, CPU runs labelled as such. Order: stage 1,
then the cached-vs-online timing, then the four losses, so the speed ratio survives a cut. Usage::

    python -m experiments.cifar10_gpu                        # GPU: full CIFAR-10, bf16, 12 workers
    python -m experiments.cifar10_gpu --tiny                 # CPU smoke run: 20 img/class, 1-2 epochs
    python -m experiments.cifar10_gpu --preset presets/cifar10-cpu.yaml --losses aekt --tag cifar10-cpu-reduced
    python -m experiments.cifar10_gpu --render-only          # re-render docs/results-cifar10.md from the JSONs
    python -m experiments.cifar10_gpu --budget-s 500 --teacher-epochs 30 --student-epochs 15   # sized to a budget

With ``--budget-s`` the epoch counts are caps and the schedule is sized to the wall-clock budget
from measurements of this run: a one-epoch teacher probe sets the teacher's epochs (a
``--teacher-share`` of the budget), and after the cached-vs-online runs the students' epochs are
the most that lets every loss finish in what is left (their start-up and evaluation included).
Each chosen number and the measurement behind it is saved in the JSON (``schedule``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import RESULTS_DIR, git_state, machine_info, modified_files
from experiments.cifar10_report import render, summary_text
from pipeline.config import load_params

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "docs" / "results-cifar10.md"
LOSSES = ("ce", "kd", "dkd", "aekt", "aekt_head_none")
RENDER_RESERVE_S = 15.0  # what --budget-s keeps back for the last save and the page render
# Per-loss settings on top of the preset's `loss` section (docs/aekt.md, CIFAR rows): KD is the
# Hinton recipe (CE 0.1 + KD 0.9, no warm-up); DKD and AEKT keep tau 4, alpha 1, beta 8, warm-up.
LOSS_OVERRIDES: dict[str, dict[str, Any]] = {
    "ce": {"name": "ce"},
    "kd": {"name": "kd", "ce_weight": 0.1, "kd_weight": 0.9, "warmup_epochs": 0},
    "dkd": {"name": "dkd"},
    "aekt": {"name": "aekt"},
    "aekt_head_none": {"name": "aekt", "head": "none"},  # the head ablation
}
# --protocol r56: the real-data experiment (experiments/cifar10_real.py) at GPU scale: the published
# resnet56 imported and fine-tuned, >= 10 views, 3 seeds x 5 methods, sized to an 8-minute budget.
PROTOCOL_R56 = {"preset": REPO / "presets" / "cifar10-resnet56.yaml", "losses": list(LOSSES), "seeds": 3,
                "views": 10, "teacher_epochs": 2, "student_epochs": 30, "budget_s": 480.0, "teacher_share": 0.15}
# --tiny: enough to run every step on a CPU in a few minutes (it proves the script, not a result).
TINY = {"max_per_class": 20, "shard_size": 25, "teacher_epochs": 1, "student_epochs": 1,
        "timing_epochs": 2, "timing_rounds": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", type=Path, default=REPO / "presets" / "cifar10.yaml")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding train.tar/test.tar (default: the preset's data.root, from the repo root)")
    p.add_argument("--tiny", action="store_true", help=f"CPU smoke-run sizes: {TINY}")
    p.add_argument("--max-per-class", type=int, default=None, help="default: the preset's (full set)")
    p.add_argument("--shard-size", type=int, default=None)
    # Defaults sized so that the whole run fits one 10-minute GPU command (docs/cifar10.md).
    p.add_argument("--teacher-epochs", type=int, default=None, help="default 12 (a short schedule)")
    p.add_argument("--student-epochs", type=int, default=None, help="default 8 per loss")
    p.add_argument("--timing-epochs", type=int, default=None, help="epochs per cached/online run (default 3)")
    p.add_argument("--timing-rounds", type=int, default=None, help="ABBA rounds of cached/online (default 1)")
    p.add_argument("--losses", default=None, help=f"comma list from {LOSSES} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="train.seed 0..N-1 per loss (default 1)")
    p.add_argument("--views", type=int, default=None,
                   help="cached views (default: the longest student run's epochs, so none is reused)")
    p.add_argument("--teacher-checkpoint", type=Path, default=None,
                   help="teacher.checkpoint to import (default: the preset's, from the repo root)")
    p.add_argument("--protocol", choices=("r56",), default=None,
                   help="the real-data GPU protocol, preset presets/cifar10-resnet56.yaml and "
                        + ", ".join(f"{k}={v}" for k, v in PROTOCOL_R56.items() if k != "preset")
                        + " (explicit flags win)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="size the teacher and student epochs (then caps) to this many wall seconds")
    p.add_argument("--teacher-share", type=float, default=0.3, help="share of --budget-s for the teacher")
    p.add_argument("--workers", type=int, default=12 if cuda else 0, help="DataLoader workers, every stage")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="bf16" if cuda else "no",
                   help="teacher/student autocast (the cache stage keeps the preset's: fp32 logits)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the stages (CPU runs)")
    p.add_argument("--work-dir", type=Path, default=None, help="default runs/bench-<tag> (wiped first)")
    p.add_argument("--tag", default=None, help="results name (default cifar10-<device>[-smoke])")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where <tag>.json goes")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="rendered from every cifar10-*.json")
    p.add_argument("--render-only", action="store_true", help="only re-render --results-md from the JSONs")
    args = p.parse_args(argv)
    if args.protocol == "r56":
        for key, value in PROTOCOL_R56.items():
            if key == "preset" and args.preset == p.get_default("preset") or \
                    key != "preset" and getattr(args, key) in (None, p.get_default(key)):
                setattr(args, key, value)
    defaults = TINY if args.tiny else {"teacher_epochs": 12, "student_epochs": 8, "timing_epochs": 3,
                                       "timing_rounds": 1}
    defaults = {**defaults, "seeds": 1, "losses": ",".join(LOSSES)}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = "cuda" if cuda else "cpu"
    args.tag = args.tag or f"cifar10-{'r56-' if args.protocol else ''}{args.device}" + ("-smoke" if args.tiny else "")
    args.work_dir = args.work_dir or REPO / "runs" / f"bench-{args.tag}"
    if isinstance(args.losses, str):
        args.losses = [name for name in args.losses.split(",") if name]
    unknown = sorted(set(args.losses) - set(LOSSES))
    if unknown:
        p.error(f"--losses: unknown {unknown}; choose from {LOSSES}")
    return args


def base_params(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with this run's sizes, precision and workers (what every step's params start from)."""
    params = load_params(args.preset)
    data, teacher, train = params["data"], params["teacher"], params["train"]
    root = Path(args.data_root or REPO / data["root"]).resolve()  # dvc runs stages from the repo root
    if not ((root / "train.tar").is_file() and (root / "test.tar").is_file()):
        raise SystemExit(f"{root}: train.tar and test.tar not found; pass --data-root to the folder "
                         "that holds them (../shared/data/cifar10-images from the repository root).")
    data.update(root=str(root), workers=args.workers)
    if args.teacher_checkpoint is not None:
        teacher["checkpoint"] = str(args.teacher_checkpoint.resolve())
    elif teacher.get("checkpoint"):
        teacher["checkpoint"] = str((REPO / teacher["checkpoint"]).resolve())
    if args.max_per_class is not None:
        data["max_per_class"] = args.max_per_class
    if args.shard_size is not None:
        data["shard_size"] = args.shard_size
    # As many cached views as the longest student run has epochs: no view is reused (cycle).
    params["augment"]["views"] = args.views or max(args.student_epochs, args.timing_epochs)
    teacher.update(epochs=args.teacher_epochs, workers=args.workers, mixed_precision=args.precision)
    params["cache"]["workers"] = args.workers
    # Keep the preset's warm-up share of the schedule (20 of 240 epochs in the AEKT recipe).
    share = params["loss"]["warmup_epochs"] / train["epochs"]
    args.warmup_share = share
    params["loss"]["warmup_epochs"] = round(share * args.student_epochs, 2)
    train.update(epochs=args.student_epochs, workers=args.workers, mixed_precision=args.precision,
                 checkpoint_every=0)
    return params


def student_params(base: dict[str, Any], args: argparse.Namespace, loss: str, epochs: int,
                   seed: int | None = None) -> dict[str, Any]:
    """``base`` with one loss's settings and ``epochs`` student epochs (warm-up scaled with them)."""
    params = json.loads(json.dumps(base))
    params["loss"].update(LOSS_OVERRIDES[loss])
    params["loss"]["warmup_epochs"] = round(args.warmup_share * epochs, 2)
    params["train"]["epochs"] = epochs
    if seed is not None:
        params["train"]["seed"] = seed
    return params


def fit_epochs(left_s: float, runs: int, epoch_s: float, overhead_s: float, measured_epochs: int,
               cap: int) -> int:
    """Most epochs (1..cap) for which ``runs`` runs fit in ``left_s`` seconds.

    One run of E epochs is estimated as E * epoch_s (training loop) + overhead_s * max(1, E /
    measured_epochs), where overhead_s (start-up plus per-epoch evaluation) was measured over a
    run of ``measured_epochs``: scaling all of it with E over-counts the start-up, so the estimate
    errs long."""
    best = 1
    for epochs in range(1, cap + 1):
        if runs * (epochs * epoch_s + overhead_s * max(1.0, epochs / measured_epochs)) <= left_s:
            best = epochs
    return best


class Runner:
    """Runs stage commands in the work folder and keeps the result JSON up to date."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.work = args, args.work_dir
        self.start = time.perf_counter()
        # `python -m stages.cli` from this interpreter: the same code as the `aekt` entry point,
        # also on a machine where the package is on PYTHONPATH but not pip-installed.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        if args.threads:
            self.env["OMP_NUM_THREADS"] = str(args.threads)
        self.result: dict[str, Any] = {"tag": args.tag, "steps": {}, "students": {}}

    def params_file(self, name: str, params: dict[str, Any]) -> str:
        path = self.work / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path.name

    def stage(self, step: str, argv: list[str]) -> tuple[float, str]:
        """(wall seconds, stdout) of `aekt ARGV`; its output goes to logs/STEP.log."""
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stages.cli", *argv], cwd=self.work, env=self.env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "logs" / f"{step}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            self.result["failed"] = {"step": step, "returncode": proc.returncode, "stderr": proc.stderr[-3000:]}
            self.save()
            raise SystemExit(f"{step} failed ({proc.returncode}); log: {self.work}/logs/{step}.log\n"
                             f"{proc.stderr[-3000:]}")
        out = proc.stdout.strip()
        last = "(JSON report)" if out.endswith("}") else (out.splitlines()[-1] if out else "")
        print(f"{step}: {seconds:.1f}s (at {self.elapsed():.0f}s)  {last[:150]}", flush=True)
        return seconds, proc.stdout

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> Path:
        self.args.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.args.out_dir / f"{self.args.tag}.json"
        path.write_text(json.dumps(self.result, indent=2) + "\n")
        return path


def epoch_seconds(history_csv: Path) -> list[float]:
    """Training-loop seconds of each epoch (samples / img_per_s; evaluation excluded)."""
    with history_csv.open() as f:
        return [round(float(r["samples"]) / float(r["img_per_s"]), 3) for r in csv.DictReader(f)]


def student_run(r: Runner, name: str, params: dict[str, Any], common: list[str]) -> dict[str, Any]:
    argv = ["student", "--params", r.params_file(name, params), *common, "--out",
            f"models/student-{name}.safetensors", "--metrics", f"metrics/student-{name}.json",
            "--history", f"plots/train-{name}.csv", "--checkpoints", f"runs/student-{name}", "--no-progress"]
    wall, _ = r.stage(f"student-{name}", argv)
    metrics = json.loads((r.work / f"metrics/student-{name}.json").read_text())
    return {"wall_s": round(wall, 2), "loss": params["loss"]["name"], "teacher_mode": metrics["teacher_mode"],
            "final_top1": metrics["final_top1"], "best_top1": metrics["best_top1"],
            "epochs": metrics["epochs"], "epoch_s": epoch_seconds(r.work / f"plots/train-{name}.csv")}


def cached_vs_online(r: Runner, base: dict[str, Any], common: list[str]) -> dict[str, Any]:
    """AEKT student epochs with cached logits vs the teacher run in every step, same data and views.

    Runs go cached, online, online, cached, ... (ABBA), so a slow spell on a shared machine lands
    on both; the first epoch of each run (worker start, kernel autotuning) is dropped when there
    are more. Epoch time is the training loop only (no evaluation)."""
    a = r.args
    order = [m for i in range(a.timing_rounds)
             for m in (("cached", "online") if i % 2 == 0 else ("online", "cached"))]
    times: dict[str, list[float]] = {"cached": [], "online": []}
    walls: dict[str, list[float]] = {"cached": [], "online": []}
    for i, mode in enumerate(order):
        params = student_params(base, a, "aekt", a.timing_epochs)
        params["train"]["teacher"] = mode
        run = student_run(r, f"timing{i}-{mode}", params, common)
        epochs = run["epoch_s"]
        times[mode] += epochs[1:] if len(epochs) > 1 else epochs
        walls[mode].append(run["wall_s"] - sum(epochs))
        r.result["cached_vs_online"] = {"order": order[:i + 1], **times}
        r.save()
    cached, online = statistics.median(times["cached"]), statistics.median(times["online"])
    return {"order": order, "epochs_per_run": a.timing_epochs, "cached_epoch_s": times["cached"],
            "online_epoch_s": times["online"], "cached_median_s": cached, "online_median_s": online,
            "online_over_cached": round(online / cached, 3),
            # wall seconds of a cached run outside its training loops (start-up + evaluations)
            "cached_overhead_s": round(max(walls["cached"]), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    r = Runner(args)
    base = base_params(args)
    name, arch = base["data"]["name"], base["teacher"]["arch"]
    manifest, store = f"manifests/{name}.json", f"cache/{name}-{arch}.zarr"
    preset = args.preset.resolve()
    r.result.update(
        kind=("gpu" if args.device == "cuda" else "cpu") + ("-smoke" if args.tiny else ""),
        machine=machine_info(torch.device(args.device)),
        preset=str(preset.relative_to(REPO)) if preset.is_relative_to(REPO) else str(preset),
        command=" ".join(["python -m experiments.cifar10_gpu", *(sys.argv[1:] if args.argv is None else args.argv)]),
        settings={"precision": args.precision, "cache_precision": base["cache"]["mixed_precision"],
                  "workers": args.workers, "threads": args.threads, "teacher": arch,
                  "student": base["student"]["arch"], "views": base["augment"]["views"],
                  "teacher_epochs": args.teacher_epochs, "student_epochs": args.student_epochs,
                  "max_per_class": base["data"]["max_per_class"], "shard_size": base["data"]["shard_size"],
                  # The trainer and stage 1 switch to channels_last and cudnn.benchmark on CUDA by
                  # themselves (pipeline/train.py, pipeline/cache/build.py).
                  "channels_last": args.device == "cuda", "cudnn_benchmark": args.device == "cuda",
                  "budget_s": args.budget_s, "seeds": args.seeds, "protocol": args.protocol},
        params=base, uncommitted=_uncommitted(), schedule={})
    stage1(r, base, manifest, store)
    common = ["--manifest", manifest, "--shards-dir", "data/shards", "--teacher", "models/teacher.safetensors",
              "--store", store]
    epochs = args.student_epochs
    if args.timing_rounds:
        timing = r.result["cached_vs_online"] = cached_vs_online(r, base, common)
        r.save()
        if args.budget_s and args.losses:
            left = args.budget_s - r.elapsed() - RENDER_RESERVE_S
            epochs = fit_epochs(left, len(args.losses) * args.seeds, timing["cached_median_s"],
                                timing["cached_overhead_s"], args.timing_epochs, args.student_epochs)
            r.result["schedule"]["student"] = {
                "left_s": round(left, 1), "epoch_s": timing["cached_median_s"],
                "overhead_s": timing["cached_overhead_s"], "epochs": epochs}
            r.result["settings"]["student_epochs"] = epochs
            print(f"schedule: {epochs} student epochs x {len(args.losses)} losses x {args.seeds} seed(s) in "
                  f"{left:.0f}s left", flush=True)
    for seed in range(args.seeds):  # seed-major: a cut run still has whole seeds of every loss
        for loss in args.losses:
            name = loss if args.seeds == 1 else f"{loss}-s{seed}"
            params = student_params(base, args, loss, epochs, seed if args.seeds > 1 else None)
            r.result["students"][name] = student_run(r, name, params, common)
            r.save()
    path = r.save()
    print(summary_text(r.result))
    print(f"wrote {path}")
    return r.result


def stage1(r: Runner, base: dict[str, Any], manifest: str, store: str) -> None:
    """prepare -> teacher -> cache -> verify-cache, each step's numbers saved as soon as it ends."""
    p0 = r.params_file("base", base)
    steps, shards = r.result["steps"], ["--shards-dir", "data/shards"]
    teacher_path = ["--teacher", "models/teacher.safetensors"]

    wall, _ = r.stage("prepare", ["prepare", "--params", p0, *shards, "--manifest", manifest])
    splits = json.loads((r.work / manifest).read_text())["splits"]
    steps["prepare"] = {"wall_s": round(wall, 2), "samples": {s: v["num_samples"] for s, v in splits.items()}}
    r.save()

    def teacher_argv(tag: str, params_name: str) -> list[str]:
        return ["teacher", "--params", params_name, "--manifest", manifest, *shards, "--out",
                f"models/{tag}.safetensors", "--metrics", f"metrics/{tag}.json", "--history",
                f"plots/{tag}.csv", "--no-progress"]

    if r.args.budget_s:  # size the teacher schedule from one measured epoch on this machine
        probe = json.loads(json.dumps(base))
        probe["teacher"]["epochs"] = 1
        wall, _ = r.stage("teacher-probe", teacher_argv("teacher-probe", r.params_file("probe", probe)))
        epoch_s = epoch_seconds(r.work / "plots/teacher-probe.csv")[0]
        steps["teacher-probe"] = {"wall_s": round(wall, 2), "epoch_s": epoch_s}
        budget = r.args.teacher_share * r.args.budget_s
        epochs = fit_epochs(budget, 1, epoch_s, wall - epoch_s, 1, r.args.teacher_epochs)
        base["teacher"]["epochs"] = r.args.teacher_epochs = epochs
        r.result["settings"]["teacher_epochs"] = epochs
        r.result["schedule"]["teacher"] = {"budget_s": round(budget, 1), "probe_wall_s": round(wall, 2),
                                           "probe_epoch_s": epoch_s, "epochs": epochs}
        p0 = r.params_file("base", base)
        print(f"schedule: {epochs} teacher epochs in {budget:.0f}s (probe epoch {epoch_s:.1f}s)", flush=True)

    wall, _ = r.stage("teacher", teacher_argv("teacher", p0))
    teacher = json.loads((r.work / "metrics/teacher.json").read_text())
    steps["teacher"] = {"wall_s": round(wall, 2), "test_top1": teacher["test_top1"], "epochs": teacher["epochs"],
                        "epoch_s": epoch_seconds(r.work / "plots/teacher.csv")}
    r.save()

    wall, _ = r.stage("cache", ["cache", "--params", p0, "--manifest", manifest, *shards, *teacher_path,
                                "--store", store, "--rebuild", "--summary", "metrics/cache.json", "--no-progress"])
    summary = json.loads((r.work / "metrics/cache.json").read_text())
    steps["cache"] = {"wall_s": round(wall, 2), "seconds": summary["seconds"],
                      "samples_written": summary["samples_written_here"], "disk_bytes": summary["disk_bytes"]}
    r.save()

    wall, out = r.stage("verify", ["verify-cache", "--params", p0, "--store", store, "--manifest", manifest,
                                   *shards, *teacher_path, "--json"])
    report = json.loads(out)
    steps["verify"] = {"wall_s": round(wall, 2), **{k: report[k] for k in (
        "ok", "checked", "max_abs_logit_error", "kl_tau1_max", "params_replayable")}}
    r.save()


def _uncommitted() -> list[str]:
    """Library files that differ from the commit machine_info names (empty: the commit is the code)."""
    if git_state()["code_modified_since_commit"] is False:  # the sender's word first (bench/device_session.sh)
        return []
    files = modified_files("pipeline", "stages")
    return ["(no git: unknown)"] if files is None else files


def _terminated(signum: int, frame: Any) -> None:
    # `timeout` sends SIGTERM: exit through the `finally` below (the running stage is killed by
    # subprocess.run, the JSON already holds every finished step) so the page is still rendered.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = argv
    if args.render_only:
        render(list(dict.fromkeys([RESULTS_DIR, args.out_dir])), args.results_md)
        print(f"wrote {args.results_md}")
        return 0
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run(args)
    finally:
        render(list(dict.fromkeys([RESULTS_DIR, args.out_dir])), args.results_md)
        print(f"wrote {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
