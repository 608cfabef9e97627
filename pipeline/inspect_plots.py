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
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from pipeline.outputs import write_files  # noqa: E402

CSV_NAME = "per_class_confidence.csv"
PNG_NAMES = ("per_class_confidence.png", "confidence_histogram.png", "reliability.png",
             "confused_pairs.png")
HEAD_PNG = "serial_head.png"
MAX_BARS = 60  # above this, the per-class plot shows the 30 lowest and 30 highest classes
# Probabilities within this of 0 or 1 (p_t = 1 in float64 included) are drawn at it: the logit
# axis has no 0 or 1.
PROB_FLOOR = 1e-6
BLUE, RED, GREEN = "#4c78a8", "#e45756", "#54a24b"


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


def _legend_beside(ax: plt.Axes) -> None:
    """Legend to the right of the axes: inside, it covers bars (the tallest, or the first bins)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _count_axis(ax: plt.Axes, which: str, counts: np.ndarray) -> None:
    """A count axis: integer ticks only. Log scale when the counts span more than ~1.5 decades (a
    good teacher piles almost every view into one bin), labelled 1, 10, 100, ...; linear otherwise."""
    axis, positive = getattr(ax, f"{which}axis"), counts[counts > 0]
    top = max(int(positive.max()) if len(positive) else 1, 1)
    if len(positive) and top / positive.min() >= 30:
        getattr(ax, f"set_{which}scale")("log")
        axis.set_major_locator(LogLocator(base=10))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        axis.set_minor_formatter(NullFormatter())
        getattr(ax, f"set_{which}lim")(0.7, top * 2.5)
    else:
        axis.set_major_locator(MaxNLocator(integer=True))
        getattr(ax, f"set_{which}lim")(0, top * 1.15)


def class_rows(per_class: list[dict[str, Any]], max_rows: int) -> tuple[list[dict[str, Any]], int]:
    """Per-class rows in the order the text report and the PNG both list them, top to bottom: by mean
    p_t, least confident first; above ``max_rows`` the lowest and highest half. Also how many are left out."""
    rows = sorted(per_class, key=lambda r: r["mean_pt"])
    hidden = max(len(rows) - max_rows, 0)
    return (rows[:max_rows // 2] + rows[-(max_rows // 2):] if hidden else rows), hidden


def write_csv(report: dict[str, Any], path: Path) -> Path:
    """One row per class in class order (stable for `dvc plots diff`)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        # teacher_error = 1 - mean_pt, floored at 1e-6: dvc.yaml draws it on a log axis, where a
        # confident teacher's classes (mean p_t 0.96-0.999) differ by orders of magnitude
        writer.writerow(["class", "mean_pt", "q10", "q50", "q90", "accuracy", "teacher_error"])
        for r in report["per_class"]:
            writer.writerow([r["class"], *(f"{r[k]:.6g}" for k in ("mean_pt", "q10", "q50", "q90", "accuracy")),
                             f"{max(1.0 - r['mean_pt'], 1e-6):.6g}"])
    return path


def _floats(values: list[float | None]) -> np.ndarray:
    """float64 array with None (an empty bin, a class the student was not tested on) as NaN: not drawn."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _probabilities(values: list[float | None]) -> np.ndarray:
    """Probabilities clipped into [FLOOR, 1 - FLOOR] for the logit axis, which has no 0 or 1."""
    return np.clip(_floats(values), PROB_FLOOR, 1 - PROB_FLOOR)


def _probability_tick(value: float, _: int) -> str:
    """1e-05, 0.0001, ..., 0.1, 0.5, 0.9, 0.99, ..., 0.99999: all the nines a tick near 1 needs."""
    if value <= 0.5:
        return f"{value:g}"
    return f"{value:.{max(int(round(-np.log10(1 - value))), 1)}f}"


def per_class_figure(report: dict[str, Any]) -> plt.Figure:
    """p_t per class on a logit axis. A confident teacher's mean p_t all sit at 0.96-0.99, where a
    linear axis shows ten equal bars; on the logit axis 0.9, 0.99, 0.999 are equally spaced, so the
    distance from 1 (the teacher's error, 1 - p_t) spans decades and ranks the classes, while a weak
    teacher's p_t near 0 is spread out the same way."""
    rows, hidden = class_rows(report["per_class"], MAX_BARS)
    student = {r["class"]: r["student_top1"] for r in report.get("student", {}).get("per_class", [])}
    y = np.arange(len(rows))
    q10, q50, q90, mean, acc = (_probabilities([r[k] for r in rows])
                                for k in ("q10", "q50", "q90", "mean_pt", "accuracy"))
    top1 = _probabilities([student.get(r["class"]) for r in rows])
    fig, ax = plt.subplots(figsize=(10.5, 2.3 + 0.3 * len(rows)))
    ax.set_xscale("logit")
    ax.hlines(y, q10, q90, color="black", lw=1.2, zorder=2, label="p_t, q10–q90 of the class's views")
    ax.plot(q50, y, "|", color="black", ms=10, mew=2, zorder=3, label="p_t, median")
    ax.plot(mean, y, "o", color=BLUE, ms=7, zorder=4, label="p_t, mean")
    ax.plot(acc, y, "x", color=RED, ms=8, mew=2, zorder=5, label="teacher accuracy (cached views)")
    if student:
        ax.plot(top1, y, "D", color=GREEN, ms=5, zorder=5, label="student top-1 (test split)")
    drawn = np.concatenate([q10, q90, mean, acc, top1])
    drawn = drawn[np.isfinite(drawn)]
    for edge in (PROB_FLOOR, 1 - PROB_FLOOR):  # mark where clipped values sit
        if (drawn == edge).any():
            ax.axvline(edge, color="gray", ls=":", lw=1)
    logits = np.log(drawn / (1 - drawn))
    ax.set_xlim(*(1 / (1 + np.exp(-x)) for x in (logits.min() - 0.6, logits.max() + 0.6)))
    ax.xaxis.set_major_formatter(FuncFormatter(_probability_tick))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.set_yticks(y, [r["class"] for r in rows], fontsize=8 if len(rows) > 30 else 10)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, as the text report lists them
    note = ""
    if hidden:  # mark where the classes left out would sit
        note = f" — {MAX_BARS // 2} lowest and highest of {len(rows) + hidden} classes"
        ax.axhline(MAX_BARS // 2 - 0.5, color="gray", ls="--", lw=1)
        ax.text(0.99, MAX_BARS // 2 - 0.5, f"{hidden} classes not shown ", ha="right", va="center",
                fontsize=8, color="gray", backgroundcolor="white", transform=ax.get_yaxis_transform())
    tau = f"τ={report['tau']:g}"
    ax.set_xlabel(f"p_t, teacher probability of the true class at {tau} — logit scale: the distance "
                  f"from 1 (0.9, 0.99, 0.999) and from 0\nis what is spaced evenly; p_t = 1 and values "
                  f"above 1 − {PROB_FLOOR:g} (or 0 and below {PROB_FLOOR:g}) are drawn at the dotted line")
    ax.set_title(f"Teacher target confidence p_t per class at {tau}{note}\nleast confident on top, as in "
                 f"the text report ({_scope(report)})", fontsize=10)
    _legend_beside(ax)
    ax.grid(axis="x", alpha=0.3)
    return fig


def histogram_figure(report: dict[str, Any]) -> plt.Figure:
    hist = report["confidence_histogram"]
    edges = np.array(hist["edges"])
    half, left = np.diff(edges) / 2, edges[:-1]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    # Side by side, not stacked: on the log axis a stacked bar would misstate the upper part.
    ax.bar(left, hist["correct"], half, align="edge", color=BLUE, label="teacher argmax = label")
    ax.bar(left + half, hist["wrong"], half, align="edge", color=RED, label="teacher argmax ≠ label")
    _count_axis(ax, "y", np.array(hist["correct"] + hist["wrong"]))
    ax.set_xticks(edges[::2])
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"p_t, teacher probability of the true class at τ={report['tau']:g}")
    ax.set_ylabel("sample-views" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    tc = report["target_confidence"]
    ax.set_title(f"Teacher target confidence p_t at τ={report['tau']:g}: mean {tc['mean']:.3f}, "
                 f"median {tc['q50']:.3f}\n({_scope(report)})", fontsize=10)
    _legend_beside(ax)
    return fig


def reliability_figure(report: dict[str, Any]) -> plt.Figure:
    bins = report["reliability"]["bins"]
    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    acc, conf = _floats([b["accuracy"] for b in bins]), _floats([b["confidence"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    seen = counts > 0
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(10, 7.5), height_ratios=(3, 1.3), sharex=True)
    # The accuracy bar takes the left 70 % of its bin and the gap a strip of its own on the right,
    # so the gap never covers the bar: the bar's top is the accuracy in every bin, whichever way the
    # bin is miscalibrated.
    bar = 0.7 * width
    ax.bar(lo[seen], acc[seen], bar[seen], align="edge", color=BLUE, edgecolor="black", lw=0.8, zorder=2,
           label="accuracy in bin (bar height)")
    low, high = np.fmin(acc, conf)[seen], np.fmax(acc, conf)[seen]
    ax.bar((lo + bar)[seen], high - low, (width - bar)[seen], bottom=low, align="edge", color=RED,
           alpha=0.45, hatch="///", edgecolor=RED, lw=0.8, zorder=2, label="gap |accuracy − confidence|")
    ax.hlines(conf[seen], lo[seen], (lo + width)[seen], color="black", lw=2, zorder=3,
              label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", zorder=1, label="perfect calibration")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (argmax = label)")
    ax.set_title(f"Reliability at τ={report['tau']:g}: ECE {report['reliability']['ece']:.4f} "
                 f"({len(bins)} equal-width bins)\n({_scope(report)})", fontsize=10)
    _legend_beside(ax)
    axc.bar(lo[seen], counts[seen], width[seen], align="edge", color="gray", edgecolor="black", lw=0.8)
    _count_axis(axc, "y", counts)
    for b in range(len(bins)):  # every bin's count, 0 included: an empty bin is not a missing one
        axc.annotate(f"{counts[b]:,}", (lo[b] + width[b] / 2, max(counts[b], axc.get_ylim()[0])),
                     xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=6.5,
                     color="black" if counts[b] else "gray")
    axc.set_ylabel("sample-views\nper bin")
    axc.set_xlabel(f"teacher max probability at τ={report['tau']:g}")
    axc.set_xlim(0, 1)
    axc.set_xticks(np.linspace(0, 1, 6))
    axc.set_xticks(np.append(lo, 1.0), minor=True)  # bin edges, unlabelled: their labels would collide
    return fig


def pairs_figure(report: dict[str, Any]) -> plt.Figure:
    pairs = report["confused_pairs"]
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.35 * max(len(pairs), 3)))
    if pairs:
        y = np.arange(len(pairs))
        ax.barh(y, [p["count"] for p in pairs], color=RED)
        ax.set_yticks(y, [f"{p['true']} → {p['predicted']}" for p in pairs])
        ax.set_ylim(len(pairs) - 0.5, -0.5)  # largest on top, as the text report lists them
        for i, p in enumerate(pairs):
            ax.text(p["count"], i, f" {p['count']} ({p['share_of_true']:.1%} of {p['true']})",
                    va="center", fontsize=8)
        ax.set_xlim(0, max(p["count"] for p in pairs) * 1.35)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax.text(0.5, 0.5, "no confusions: the teacher's argmax equals the label on every view",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        ax.set_xticks([])
    ax.set_xlabel("sample-views with teacher argmax = predicted, label = true")
    ax.set_ylabel("true → predicted")
    ax.set_title(f"Teacher's most confused class pairs (top {len(pairs)})\n({_scope(report)})", fontsize=10)
    return fig


def head_figure(report: dict[str, Any], weight: np.ndarray, classes: tuple[str, ...]) -> plt.Figure:
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
    return fig


def _render(figure: Any, *args: Any) -> Any:
    """A writer for ``write_files``: draw ``figure(*args)`` and save it to the path it is given."""
    return lambda path: _save(figure(*args), path)


def write_plots(report: dict[str, Any], plots_dir: Path, *, head_weight: np.ndarray | None,
                classes: tuple[str, ...]) -> list[Path]:
    """Write the CSV and the PNGs into ``plots_dir``; returns their paths. All or nothing: each file
    is rendered to a temporary name and the set is renamed into place only once every file is
    written, so a full disk leaves the previous plots as they were."""
    writers = {plots_dir / CSV_NAME: partial(write_csv, report)}
    for name, figure in zip(PNG_NAMES, (per_class_figure, histogram_figure, reliability_figure,
                                        pairs_figure), strict=True):
        writers[plots_dir / name] = _render(figure, report)
    if head_weight is not None:
        writers[plots_dir / HEAD_PNG] = _render(head_figure, report, head_weight, classes)
    return write_files(writers, rerun="aekt inspect")
