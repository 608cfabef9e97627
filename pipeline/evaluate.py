"""Evaluate stage: the exported student (z_cls, no head) on the test split."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.artifacts import load_model  # noqa: E402
from pipeline.augment import Normalization  # noqa: E402
from pipeline.config import AugmentConfig, EvalConfig  # noqa: E402
from pipeline.data import Manifest  # noqa: E402
from pipeline.data.location import Location
from pipeline.outputs import write_files  # noqa: E402
from pipeline.reports import write_metrics  # noqa: E402
from pipeline.stream import ShardStream, StreamSpec  # noqa: E402
from pipeline.train import inference_device, predict, topk_hits  # noqa: E402


def accuracy_report(logits: np.ndarray, labels: np.ndarray, classes: list[str], top_k: int) -> dict:
    k = min(top_k, logits.shape[1])
    hits = topk_hits(logits, labels, (1, k))
    per_class = {}
    for c, name in enumerate(classes):
        mask = labels == c
        per_class[name] = float(hits[1][mask].mean()) if mask.any() else None
    return {"top1": float(hits[1].mean()),
            f"top{k}": float(hits[k].mean()),
            "num_samples": int(len(labels)), "per_class_top1": per_class}


def write_per_class_csv(path: Path, per_class: dict[str, float | None]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "top1"])
        writer.writerows([name, f"{acc:.4f}" if acc is not None else ""] for name, acc in per_class.items())


def confusion(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (labels, logits.argmax(1)), 1)
    return out


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    n = len(classes)
    size = min(14, 3 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, matrix[i, j], ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)  # atomically: run_evaluate hands it a temporary path (write_files)
    finally:
        plt.close(fig)


def teacher_agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Share of test samples where the student's top-1 class is the teacher's (distillation fidelity,
    independent of the labels)."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).mean())


# eval.json is a row of `dvc exp show`: the scalars to compare (top-1, top-k, samples, the teacher's
# top-1 and agreement). Per-class accuracy is in plots/eval/per_class.{csv,json}, not here.
NOT_METRICS = ("model", "arch", "per_class_top1")


def run_evaluate(*, model_path: Path, manifest_path: Path, shards_dir: Location, metrics_path: Path,
                 plots_dir: Path, cfg: EvalConfig, aug: AugmentConfig,
                 teacher_path: Path | None = None) -> dict[str, Any]:
    model, card = load_model(model_path)
    manifest = Manifest.load(manifest_path)
    spec = StreamSpec(manifest_path=manifest_path, shards_dir=shards_dir, split="test", recipe=aug.recipe,
                      image_size=aug.size, aug_seed=aug.seed, views=1, train=False, decode=aug.decode)
    device = inference_device(cfg.device, "params.yaml eval.device")
    logits, labels = predict(model.to(device), ShardStream(spec), device=device, batch_size=cfg.batch_size,
                             workers=cfg.workers, norm=Normalization.from_card(card), desc="evaluate student")
    model.cpu()
    classes = list(manifest.classes)
    report = {"model": str(model_path), "arch": card["arch"], **accuracy_report(logits, labels, classes,
                                                                                cfg.top_k)}
    if teacher_path is not None:
        teacher, t_card = load_model(teacher_path)
        t_logits, t_labels = predict(teacher.to(device), ShardStream(spec), device=device,
                                     batch_size=cfg.batch_size, workers=cfg.workers,
                                     norm=Normalization.from_card(t_card), desc="evaluate teacher")
        teacher.cpu()
        assert (t_labels == labels).all()  # one deterministic stream: same samples, same order
        report["teacher_top1"] = float((t_logits.argmax(1) == labels).mean())
        report["teacher_agreement"] = teacher_agreement(logits, t_logits)
    metrics = {k: v for k, v in report.items() if k not in NOT_METRICS}
    matrix = confusion(logits, labels, len(classes))
    title = f"{card['arch']} on {manifest.dataset} test: top-1 {report['top1']:.1%}"
    # All or nothing: every file is written to a temporary name first, so a full disk leaves the
    # previous report (metrics, per-class files, confusion matrix) whole.
    write_files({
        metrics_path: lambda tmp: write_metrics(tmp, metrics),
        # Per-class detail for people and `aekt inspect --eval-metrics` (reads per_class_top1).
        plots_dir / "per_class.json": lambda tmp: write_metrics(tmp, {"per_class_top1": report["per_class_top1"]}),
        plots_dir / "per_class.csv": lambda tmp: write_per_class_csv(tmp, report["per_class_top1"]),
        plots_dir / "confusion.png": lambda tmp: plot_confusion(matrix, classes, tmp, title),
    }, rerun="aekt evaluate")
    return report
