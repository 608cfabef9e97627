"""Rendering of an `aekt inspect` report: the text summary, the per-class CSV and the PNG plots.

Everything here reads the JSON-able report built by ``pipeline.inspect_cache`` (plus the serial
head's weight matrix, which is too large for the report), so text, CSV and plots cannot disagree.
"""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pipeline.outputs import write_files  # noqa: E402

CSV_NAME = "per_class_confidence.csv"
PNG_NAMES = ("per_class_confidence.png", "confidence_histogram.png", "reliability.png",
             "confused_pairs.png")
HEAD_PNG = "serial_head.png"
MAX_BARS = 60  # above this, bar charts show the 30 lowest and 30 highest classes


def _save(fig: plt.Figure, path: Path) -> Path:
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _scope(report: dict[str, Any]) -> str:
    return (f"{report['dataset']}, teacher {report['teacher_arch']}, "
            f"{report['sample_views']:,} cached sample-views")


def write_csv(report: dict[str, Any], path: Path) -> Path:
    """One row per class in class order (stable for `dvc plots diff`)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "mean_pt", "q10", "q50", "q90", "accuracy"])
        for r in report["per_class"]:
            writer.writerow([r["class"], *(f"{r[k]:.6g}" for k in ("mean_pt", "q10", "q50", "q90",
                                                                    "accuracy"))])
    return path


def plot_per_class(report: dict[str, Any], path: Path) -> Path:
    rows = sorted(report["per_class"], key=lambda r: r["mean_pt"])
    note, hidden = "", len(rows) - MAX_BARS
    if hidden > 0:
        note = f" — {MAX_BARS // 2} lowest and highest of {len(rows)} classes"
        rows = rows[:MAX_BARS // 2] + rows[-MAX_BARS // 2:]
    student = {r["class"]: r["student_top1"] for r in report.get("student", {}).get("per_class", [])}
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.28 * len(rows)))
    ax.barh(y, [r["mean_pt"] for r in rows], color="#9ecae9", label="teacher mean p_t")
    ax.hlines(y, [r["q10"] for r in rows], [r["q90"] for r in rows], color="black", lw=1.2,
              label="p_t q10–q90")
    ax.plot([r["q50"] for r in rows], y, "|", color="black", ms=9, mew=2, label="p_t median")
    ax.plot([r["accuracy"] for r in rows], y, "x", color="#e45756", ms=7, mew=2,
            label="teacher accuracy (cached views)")
    if student:
        values = [student.get(r["class"]) for r in rows]
        ax.plot([np.nan if v is None else v for v in values], y, "D", color="#54a24b", ms=5,
                label="student top-1 (test split)")
    ax.set_yticks(y, [r["class"] for r in rows], fontsize=8 if len(rows) > 30 else 10)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    if note:  # mark where the classes left out would sit
        ax.axhline(MAX_BARS // 2 - 0.5, color="gray", ls="--", lw=1)
        ax.text(1.0, MAX_BARS // 2 - 0.5, f"{hidden} classes not shown ", ha="right", va="center",
                fontsize=8, color="gray", backgroundcolor="white")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"teacher probability of the true class, p_t at τ={report['tau']:g}")
    ax.set_title(f"Teacher target confidence p_t per class at τ={report['tau']:g}{note}\n({_scope(report)})",
                 fontsize=10)
    # Outside the axes: inside, it would hide the bars of the least confident classes.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_histogram(report: dict[str, Any], path: Path) -> Path:
    hist = report["confidence_histogram"]
    edges = np.array(hist["edges"])
    half, left = np.diff(edges) / 2, edges[:-1]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # Side by side, not stacked: on the log axis a stacked bar would misstate the upper part.
    ax.bar(left, hist["correct"], half, align="edge", color="#4c78a8", label="teacher argmax = label")
    ax.bar(left + half, hist["wrong"], half, align="edge", color="#e45756", label="teacher argmax ≠ label")
    # A good teacher piles almost every view into the last bin; a log axis keeps the rest visible.
    ax.set_yscale("log")
    ax.set_xticks(edges[::2])
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"p_t, teacher probability of the true class at τ={report['tau']:g}")
    ax.set_ylabel("sample-views (log scale)")
    tc = report["target_confidence"]
    ax.set_title(f"Teacher target confidence p_t at τ={report['tau']:g}: mean {tc['mean']:.3f}, "
                 f"median {tc['q50']:.3f}\n({_scope(report)})", fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    return _save(fig, path)


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    bins = report["reliability"]["bins"]
    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(8.5, 7), height_ratios=(3, 1), sharex=True)
    seen = ~np.isnan(acc)
    ax.bar(lo[seen], acc[seen], width[seen], align="edge", color="#4c78a8", edgecolor="black", zorder=2,
           label="accuracy in bin (bar top)")
    # The gap spans accuracy..confidence in either direction; hatched and unfilled, drawn over the bar,
    # so the bar's own top stays the accuracy (an underconfident bin's gap lies inside the bar).
    low, high = np.minimum(acc, conf)[seen], np.maximum(acc, conf)[seen]
    ax.bar(lo[seen], high - low, width[seen], bottom=low, align="edge", fill=False, hatch="///",
           edgecolor="#e45756", linewidth=0, zorder=3, label="gap between accuracy and confidence")
    ax.hlines(conf[seen], lo[seen], (lo + width)[seen], color="black", linewidth=2.2, zorder=4,
              label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", zorder=1, label="perfect calibration")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (argmax = label)")
    ax.set_title(f"Reliability at τ={report['tau']:g}: ECE {report['reliability']['ece']:.4f} "
                 f"({len(bins)} equal-width bins)\n({_scope(report)})", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)  # never over a bin
    counts = np.array([max(b["count"], 0) for b in bins])
    axc.bar(lo[counts > 0], counts[counts > 0], width[counts > 0], align="edge", color="gray", edgecolor="black")
    axc.set_yscale("log")  # empty bins are left out instead of drawn at a symlog 0 beside 10^0
    axc.set_ylim(0.8, max(counts.max(), 1) * 2)
    axc.set_ylabel("views per bin")
    axc.set_xlabel(f"teacher max probability at τ={report['tau']:g}")
    axc.set_xlim(0, 1)
    return _save(fig, path)


def plot_pairs(report: dict[str, Any], path: Path) -> Path:
    pairs = report["confused_pairs"][::-1]  # largest on top
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.35 * max(len(pairs), 3)))
    if pairs:
        y = np.arange(len(pairs))
        ax.barh(y, [p["count"] for p in pairs], color="#e45756")
        ax.set_yticks(y, [f"{p['true']} → {p['predicted']}" for p in pairs])
        for i, p in enumerate(pairs):
            ax.text(p["count"], i, f" {p['count']} ({p['share_of_true']:.1%} of {p['true']})",
                    va="center", fontsize=8)
        ax.set_xlim(0, max(p["count"] for p in pairs) * 1.35)
    else:
        ax.text(0.5, 0.5, "no confusions: the teacher's argmax equals the label on every view",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("sample-views with teacher argmax = predicted, label = true")
    ax.set_ylabel("true → predicted")
    ax.set_title(f"Teacher's most confused class pairs (top {len(pairs)})\n({_scope(report)})", fontsize=10)
    return _save(fig, path)


def plot_head(report: dict[str, Any], weight: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    delta = weight - np.eye(len(classes))
    limit = float(np.abs(delta).max()) or 1.0
    n = len(classes)
    size = min(14.0, 4.0 + 0.42 * n)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(delta, cmap="RdBu_r", vmin=-limit, vmax=limit)  # symmetric: white is exactly 0
    unit = "class" if n <= 40 else "class index"
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=60 if max(map(len, classes)) > 2 else 0,
                      ha="right" if max(map(len, classes)) > 2 else "center", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{delta[i, j]:+.3f}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(delta[i, j]) > 0.6 * limit else "black")
    index = {c: i for i, c in enumerate(classes)}
    for k, p in enumerate(report["confused_pairs"]):
        # Teacher confusion true=j -> predicted=i is the cell (row z_kd=i, column z_cls=j).
        ax.add_patch(Rectangle((index[p["true"]] - 0.5, index[p["predicted"]] - 0.5), 1, 1, fill=False,
                               ec="black", lw=1.8, label="teacher's top confused pairs" if k == 0 else None))
    if report["confused_pairs"]:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), fontsize=8, frameon=False)
    ax.set_xlabel(f"z_cls {unit} (classification logit, input of FC_TS)")
    ax.set_ylabel(f"z_kd {unit} (distillation logit, output of FC_TS)")
    head = report["student"]["head"]
    ax.set_title(f"Serial head FC_TS: W − I (diagonal mean {head['diag_mean']:.3f}, "
                 f"mean |off-diagonal| {head['offdiag_abs_mean']:.4f})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="W − I (0 = identity)")
    return _save(fig, path)


def write_plots(report: dict[str, Any], plots_dir: Path, *, head_weight: np.ndarray | None,
                classes: tuple[str, ...]) -> list[Path]:
    """Write the CSV and the PNGs into ``plots_dir``; returns their paths. All or nothing: each file
    is rendered to a temporary name and the set is renamed into place only once every file is
    written, so a full disk leaves the previous plots as they were."""
    writers = {plots_dir / CSV_NAME: partial(write_csv, report)}
    for name, fn in zip(PNG_NAMES, (plot_per_class, plot_histogram, plot_reliability, plot_pairs),
                        strict=True):
        writers[plots_dir / name] = partial(fn, report)
    if head_weight is not None:
        writers[plots_dir / HEAD_PNG] = partial(plot_head, report, head_weight, classes)
    return write_files(writers, rerun="aekt inspect")


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{x:6.1%}"


def format_text(report: dict[str, Any], max_rows: int = 20) -> str:
    """The human-readable report `aekt inspect` prints (``--json`` prints ``report`` itself)."""
    rows, tc, va = report["rows"], report["target_confidence"], report["view_agreement"]
    lines = [f"{report['store']} ({report['dataset']}, teacher {report['teacher_arch']}, codec "
             f"{report['codec']}): {rows['done']} of {rows['total']} (view, shard) rows finished"
             + ("" if rows["complete"] else " — store still being written or incomplete"),
             f"read {rows['read']} rows: {report['sample_views']:,} sample-views of {report['samples']:,} "
             f"samples, views {report['views']}"
             + (f", classes {', '.join(report['classes'])}" if report["classes"] else ""),
             f"teacher accuracy on cached views: {report['accuracy']:.2%}",
             f"target confidence p_t at tau={report['tau']:g}: mean {tc['mean']:.4f}  q10 {tc['q10']:.4f}  "
             f"q50 {tc['q50']:.4f}  q90 {tc['q90']:.4f}",
             f"ECE at tau={report['tau']:g} (15 bins): {report['reliability']['ece']:.4f}",
             f"non-target entropy: mean {report['nontarget_entropy']['mean']:.3f} nats "
             f"(uniform over C-1 classes: {report['nontarget_entropy']['max']:.3f})",
             "view agreement: " + ("needs two or more views" if va is None else
                                   f"{va['all_views_agree']:.2%} of {va['samples']:,} samples agree on all "
                                   f"{va['views']} views; mean pairwise {va['mean_pairwise']:.2%}"),
             "", "per class, sorted by mean p_t" + (f" (lowest and highest {max_rows // 2})"
                                                      if len(report["per_class"]) > max_rows else "") + ":",
             f"  {'class':<16}{'views':>7}{'mean_pt':>9}{'q10':>7}{'q50':>7}{'q90':>7}{'acc':>8}{'ntH':>7}"]
    per_class = sorted(report["per_class"], key=lambda r: r["mean_pt"])
    if len(per_class) > max_rows:
        per_class = per_class[:max_rows // 2] + per_class[-max_rows // 2:]
    lines += [f"  {r['class'][:15]:<16}{r['count']:>7}{r['mean_pt']:>9.4f}{r['q10']:>7.3f}{r['q50']:>7.3f}"
              f"{r['q90']:>7.3f}{_pct(r['accuracy']):>8}{r['nt_entropy']:>7.3f}" for r in per_class]
    lines += ["", "most confused (teacher argmax != label, over views):"]
    lines += [f"  {p['true']} -> {p['predicted']}: {p['count']} views ({p['share_of_true']:.1%} of "
              f"{p['true']})" for p in report["confused_pairs"]] or ["  none"]
    lines += _student_lines(report.get("student"))
    if report.get("plots"):
        lines += ["", "wrote " + ", ".join(report["plots"])]
    return "\n".join(lines)


def _student_lines(student: dict[str, Any] | None) -> list[str]:
    if student is None:
        return []
    lines = ["", f"student {student['student']}:"]
    if student["head"] is None:
        lines.append(f"  {student['message']}")
    else:
        lines.append("  strongest off-diagonal FC_TS weights (z_kd class <- z_cls class) vs teacher "
                     "confusions (label = z_cls class, argmax = z_kd class):")
        lines += [f"  {p['z_kd']} <- {p['z_cls']}: W {p['weight']:+.4f}, teacher confusions "
                  f"{p['teacher_confusions']}" for p in student["head"]["pairs"]] or ["  none (W = I)"]
    if "per_class" in student:
        lines.append("  per class: teacher mean p_t / accuracy (cached train views) vs student top-1 (test):")
        lines += [f"  {r['class'][:15]:<16}{r['teacher_mean_pt']:>8.4f}{_pct(r['teacher_accuracy']):>8}"
                  f"{_pct(r['student_top1']):>8}" for r in student["per_class"]]
    return lines
