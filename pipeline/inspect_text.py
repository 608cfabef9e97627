"""The text report `aekt inspect` prints (``--json`` prints the report itself)."""

from __future__ import annotations

from typing import Any

from pipeline.inspect_plots import class_rows


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
             _labels_line(report["labels_from"]),
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
    per_class, _ = class_rows(report["per_class"], max_rows)
    lines += [f"  {r['class'][:15]:<16}{r['count']:>7}{r['mean_pt']:>9.4f}{r['q10']:>7.3f}{r['q50']:>7.3f}"
              f"{r['q90']:>7.3f}{_pct(r['accuracy']):>8}{r['nt_entropy']:>7.3f}" for r in per_class]
    lines += ["", "most confused (teacher argmax != label, over views):"]
    lines += [f"  {p['true']} -> {p['predicted']}: {p['count']} views ({p['share_of_true']:.1%} of "
              f"{p['true']})" for p in report["confused_pairs"]] or ["  none"]
    lines += _student_lines(report.get("student"))
    if report.get("plots"):
        lines += ["", "wrote " + ", ".join(report["plots"])]
    return "\n".join(lines)


def _labels_line(sources: dict[str, int]) -> str:
    if not sources["shards"]:
        return f"labels: from the store ({sources['store']} shards; no shard file read)"
    why = ("the store predates stored labels (schema 1; a store built by `aekt cache` now holds them)"
           if not sources["store"] else f"{sources['store']} from the store, the rest's labels chunks are missing")
    return f"labels: read from {sources['shards']} shard files, each checked against its sha256 — {why}"


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
