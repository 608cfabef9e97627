"""Analysis for ``experiments.run``: per-term gradient probe, paired statistics, plot, and the files.

Seeds are paired: train.seed fixes the student's initialisation and the data order, and both are the
same for every method (the serial head starts at the identity), so a method's per-seed difference
to a reference cancels the seed's own luck. With 5 seeds that is still little: the t-interval is
wide, and a two-sided sign test cannot go below p = 2/2^5 = 0.0625.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from experiments.markdown import render, render_cifar
from experiments.stats import analyse
from pipeline import augment
from pipeline.config import LossConfig, section
from pipeline.data import Manifest
from pipeline.losses import compute_loss
from pipeline.stream import ShardStream, StreamSpec
from pipeline.student import build_student

PACKAGES = ("torch", "numpy", "scipy", "accelerate", "zarr", "webdataset", "dvc", "matplotlib")
# (a, b): report a − b per seed. Chosen before the run: the question and each AEKT switch.


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True).stdout.strip()

    # Other people edit this tree: record the commit and how many tracked files differed from it.
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu_model": model,
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "git_modified_files": len(git("status", "--porcelain", "--untracked-files=no").splitlines()),
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions}


def probe_batch(stage1: dict[str, Any], params: dict[str, Any], size: int) -> dict[str, torch.Tensor]:
    """A fixed batch of training images with their cached teacher logits (view 1, seed 0 order)."""
    aug = section(params, "augment")
    spec = StreamSpec(manifest_path=Path(stage1["manifest"]), shards_dir=Path(stage1["shards_dir"]),
                      split="train", recipe=aug.recipe, image_size=aug.size, aug_seed=aug.seed,
                      views=aug.views, store_path=Path(stage1["store"]))
    batch = next(iter(DataLoader(ShardStream(spec, epoch=1), batch_size=size)))
    return {"x": augment.normalize(batch["image"], aug.recipe), "y": batch["label"], "t": batch["teacher"]}


def _norm(grads: Sequence[torch.Tensor | None]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))


def term_gradients(model: torch.nn.Module, loss: LossConfig, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-term value and gradient norms (body parameters, and the logits the term acts on, ×N so
    it reads per sample), λ(e)=1. For AEKT also the explicit term at w=1: what DKD would apply."""
    z_cls, z_kd = model(batch["x"])
    body, head = model.body_parameters(), model.head_parameters()
    configs = {"": loss}
    if loss.name == "aekt" and loss.adaptive == "ratio":
        configs["@w=1"] = replace(loss, adaptive="none")
    rows: dict[str, Any] = {}
    for suffix, cfg in configs.items():
        out = compute_loss(cfg, z_cls=z_cls, z_kd=z_kd, teacher_logits=batch["t"], targets=batch["y"],
                           warmup=1.0)
        for name, term in out.terms.items():
            if suffix and name != "explicit":
                continue
            logits = z_cls if name == "ce" else z_kd
            rows[name + suffix] = {
                "value": float(term.detach()),
                "grad_body": _norm(torch.autograd.grad(term, body, retain_graph=True, allow_unused=True)),
                "grad_head": _norm(torch.autograd.grad(term, head, retain_graph=True, allow_unused=True))
                if head and name != "ce" else None,
                "grad_logits_per_sample": float(torch.autograd.grad(term, logits, retain_graph=True)[0]
                                                .norm(dim=1).mean() * len(batch["y"]))}
        if not suffix:
            rows["stats"] = {k: v for k, v in out.stat_values().items() if k != "stat/warmup"}
    rows["train_batch_top1"] = float((z_cls.argmax(1) == batch["y"]).float().mean())
    return rows


def gradient_probe(stage1: dict[str, Any], params: dict[str, Any], cells: list[dict[str, Any]],
                   configs: Callable[[str], dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Per-term gradient norms at initialisation and after training (seed-0 checkpoints);
    ``configs(method)`` gives the cell's seed-0 configs (as ``train_student`` takes them)."""
    batch, manifest = probe_batch(stage1, params, batch_size), Manifest.load(Path(stage1["manifest"]))
    result: dict[str, Any] = {"batch_size": len(batch["y"])}
    for cell in cells:
        if not cell.get("checkpoint"):
            continue
        cfg = configs(cell["method"])
        model = build_student(cfg["student"].arch, manifest, cfg["loss"], seed=0)
        states = {"init": term_gradients(model, cfg["loss"], batch)}
        latest = sorted(Path(cell["checkpoint"]).glob("epoch-*"))[-1]
        model.load_state_dict(load_file(str(latest / "model.safetensors")))
        states["final"] = term_gradients(model, cfg["loss"], batch)
        result[cell["method"]] = states
    return result


def write_all(payload: dict[str, Any], *, json_path: Path, doc_path: Path, plot_path: Path) -> None:
    """JSON + plot for this run; the doc from the digits JSON plus, if there is one, the CIFAR-10 JSON
    beside it (a CIFAR-only run re-renders the doc with the digits results already on disk)."""
    payload = {**payload, "analysis": analyse(payload), "json": str(json_path), "plot": str(plot_path)}
    for path in (json_path, doc_path, plot_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    plot(payload, plot_path)
    runs = {payload.get("dataset", "digits"): payload}
    for name in ("digits", "cifar10"):
        sibling = json_path.with_name(f"experiments-{name}.json")
        if name not in runs and payload["kind"] == "full" and sibling.exists():
            runs[name] = json.loads(sibling.read_text())
    text = render(runs["digits"], doc_path=doc_path) if "digits" in runs else "# Results\n"
    if "cifar10" in runs:
        text += "\n" + render_cifar(runs["cifar10"], doc_path=doc_path)
    doc_path.write_text(text)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["analysis"]["summary"]
    methods = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.3, 1]})
    colors = {"baseline": "tab:blue", "aekt": "tab:red", "ablation": "tab:orange", "control": "tab:green"}
    for i, m in enumerate(methods):
        s, color = summary[m], colors.get(payload["methods"][m]["group"], "grey")
        seeds = sorted(s["final"])
        left.scatter([s["final"][k] for k in seeds], [i + 0.08 * (k - 2) for k in seeds], s=12, color=color,
                     alpha=0.6)
        left.errorbar(s["final_mean"], i, xerr=0 if np.isnan(s["final_std"]) else s["final_std"], fmt="o",
                      color=color, ms=7, capsize=4, mfc="white")
    left.set_yticks(range(len(methods)), methods)
    left.invert_yaxis()
    left.axvline(100 * payload["stage1"]["teacher_top1"], color="black", ls=":", lw=1, label="teacher")
    left.set_xlabel("final-epoch test top-1 (%): dots = seeds, circle = mean ± std")
    left.legend(loc="lower left")
    left.grid(axis="x", alpha=0.3)
    for m in [m for m in ("ce", "kd", "dkd", "aekt", "aekt_head_none") if m in summary]:
        curves = np.array([c["history"]["test_top1"] for c in payload["cells"] if c["method"] == m]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        right.plot(epochs, curves.mean(0), label=m)
        right.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
    right.set_xlabel("epoch")
    right.set_ylabel("test top-1 (%), mean and min-max over seeds")
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.suptitle(f"{payload['params']['data']['name']}: {payload['params']['student']['arch']} student, "
                 f"{payload['params']['teacher']['arch']} teacher, {len(summary[methods[0]]['final'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
