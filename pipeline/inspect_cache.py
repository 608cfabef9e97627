"""`aekt inspect`: what the cached teacher will teach, computed straight from the Zarr logit store.

No teacher is run. Every finished (view, shard) chunk row is decoded, reduced to per-(view, sample)
summaries (target confidence p_t, max probability, argmax, non-target entropy) and dropped, so memory
grows with the number of sample-views, not with sample-views × classes. The statistics are pure
functions of those arrays; ``inspect_store`` assembles them into one JSON-able report (see
docs/inspect.md for every field) and, given ``plots_dir``, writes the PNGs and the per-class CSV.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.store import CacheError, LogitStore
from pipeline.data import DataError, Manifest, sha256_file
from pipeline.data.location import Location, as_location, join
from pipeline.inspect_stats import (
    QUANTILES,
    class_summary,
    confidence_histogram,
    confusion_counts,
    reliability,
    summarise_logits,
    top_offdiagonal,
    view_agreement,
)
from pipeline.progress import Progress

log = logging.getLogger(__name__)


class InspectError(CacheError):
    """Bad input to `aekt inspect` (a CacheError, so the CLI shows it as a message, not a traceback)."""


# ---- reading the store ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedViews:
    """Summaries of the finished sample-views read from the store, one entry per (view, sample)."""

    view: np.ndarray  # [M] int
    index: np.ndarray  # [M] global sample index
    label: np.ndarray  # [M]
    p_t: np.ndarray  # [M] at tau
    p_max: np.ndarray  # [M] at tau
    pred: np.ndarray  # [M] teacher argmax
    nt_entropy: np.ndarray  # [M] nats, at tau

    def subset(self, keep: np.ndarray) -> CachedViews:
        return CachedViews(**{k: getattr(self, k)[keep] for k in self.__dataclass_fields__})


def shard_labels(manifest: Manifest, shards_dir: Location, shard: int, start: int, end: int) -> np.ndarray:
    """Labels of one training shard (checksum verified), checked against the store's index range."""
    info = manifest.splits["train"].shards[shard]
    samples = manifest.read_shard(shards_dir, "train", shard)  # sha256, labels < num_classes, indices
    if [s.index for s in samples] != list(range(start, end)):
        raise CacheError(f"{join(shards_dir, info.name)}: indices do not match the store's range [{start}, "
                         f"{end}); rerun `aekt prepare` and `aekt cache`.")
    return np.array([s.label for s in samples], dtype=np.int64)


def read_views(store: LogitStore, manifest: Manifest, shards_dir: Location, *, done: np.ndarray,
               views: list[int], shards: list[int], tau: float) -> tuple[CachedViews, dict[str, int]]:
    """Decode the rows of ``views`` × ``shards`` marked in ``done`` ``[V, n_shards]`` (one shard's
    labels serve all its views). Labels come from the store (written there before the shard's first
    done marker); a store without them (schema 1) falls back to reading each shard. Also returns how
    many shards' labels came from each source."""
    parts: list[dict[str, np.ndarray]] = []
    sources = {"store": 0, "shards": 0}
    rows = int(done[np.ix_(views, shards)].sum())
    bar = Progress(rows, "inspect rows", "row", logger=log)
    for shard in shards:
        todo = [v for v in views if done[v, shard]]
        if not todo:
            continue
        start, end = store.provenance.shard_range(shard)
        labels, source = store.read_labels(shard), "store"
        if labels is None:
            why = ("its labels chunk is missing (rerun `aekt cache` to rewrite it)" if store.has_labels else
                   "it was written before stores held labels (schema 1; rebuild it to store them)")
            if store.has_labels:  # written before every marker: only a damaged store lacks it
                log.warning("%s: shard %d: %s; reading the shard instead", store.path, shard, why)
            try:
                labels, source = shard_labels(manifest, shards_dir, shard, start, end), "shards"
            except DataError as err:
                raise InspectError(f"{err} The labels of shard {shard} must come from the shards because "
                                   f"{store.path} does not hold them: {why}; or pass --shards-dir with "
                                   "the folder of the training shards.") from err
        sources[source] += 1
        for v in todo:
            logits, _ = store.read_row(v, shard, labels)  # [n, C]
            parts.append({"view": np.full(end - start, v), "index": np.arange(start, end),
                          "label": labels, **summarise_logits(logits, labels, tau)})
            bar.update(1)
    bar.close()
    if not parts:
        raise CacheError(f"{store.path}: no finished (view, shard) rows among views {views}; run "
                         "`aekt cache` (or wait for it) first.")
    return CachedViews(**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}), sources


def resolve_classes(selected: list[str], classes: tuple[str, ...]) -> list[int]:
    """Class names or indices -> indices; a name wins over an index (digits' names are '0'..'9')."""
    out = []
    for item in selected:
        if item in classes:
            out.append(classes.index(item))
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(classes):
            out.append(int(item))
        else:
            close = difflib.get_close_matches(item, classes, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise InspectError(f"--class {item!r}: not a class name or an index 0..{len(classes) - 1}."
                             f"{hint} Classes: {', '.join(classes[:20])}{' …' if len(classes) > 20 else ''}.")
    return sorted(set(out))


def pick_shards(num_shards: int, max_shards: int | None) -> list[int]:
    """All shards, or ``max_shards`` evenly spaced ones (a deterministic sample for large datasets)."""
    if max_shards is None or max_shards >= num_shards:
        return list(range(num_shards))
    return sorted({int(round(x)) for x in np.linspace(0, num_shards - 1, max(max_shards, 1))})


# ---- the report ------------------------------------------------------------------------------------
def teacher_report(data: CachedViews, classes: tuple[str, ...],
                   tau: float) -> tuple[dict[str, Any], np.ndarray]:
    """All teacher statistics of ``data``, plus the full confusion count matrix ``[C, C]``."""
    correct = data.pred == data.label
    q = np.quantile(data.p_t, QUANTILES)
    per_class = [{"class": classes[c], "index": int(c), "count": int((data.label == c).sum()),
                  "nt_entropy": float(data.nt_entropy[data.label == c].mean()),
                  **class_summary(data.p_t[data.label == c], correct[data.label == c])}
                 for c in np.unique(data.label)]
    confusion = confusion_counts(data.pred, data.label, len(classes))
    per_true = confusion.sum(axis=1)
    pairs = [{"true": classes[t], "predicted": classes[p], "count": int(confusion[t, p]),
              "share_of_true": float(confusion[t, p] / per_true[t])} for t, p in top_offdiagonal(confusion)]
    # Agreement needs every selected view of a sample: keep samples whose shard is done on all of them.
    views = np.unique(data.view)
    full = np.bincount(data.index)[data.index] == len(views)
    order = np.lexsort((data.index[full], data.view[full]))
    by_view = data.pred[full][order].reshape(len(views), -1) if full.any() else np.zeros((0, 0), int)
    report = {
        "tau": tau, "sample_views": int(len(data.p_t)), "samples": int(len(np.unique(data.index))),
        "accuracy": float(correct.mean()),
        "target_confidence": {"mean": float(data.p_t.mean()), "q10": float(q[0]), "q50": float(q[1]),
                              "q90": float(q[2])},
        "reliability": reliability(data.p_max, correct),
        "confidence_histogram": confidence_histogram(data.p_t, correct),
        "nontarget_entropy": {"mean": float(data.nt_entropy.mean()),
                              "max": float(np.log(max(len(classes) - 1, 1)))},
        "per_class": per_class, "confused_pairs": pairs, "view_agreement": view_agreement(by_view)}
    return report, confusion


def load_head(head_path: Path, student_path: Path) -> tuple[np.ndarray | None, dict[str, str]]:
    """FC_TS weight (None when the loss had no serial head) and metadata of the head file, refused
    unless it records the sha256 of ``student_path``: a head left beside the student by another run
    must not be shown as this student's."""
    from safetensors import SafetensorError, safe_open

    rerun = ("Rerun `aekt student` (or `dvc repro student`), which writes the student and its head "
             "together, or pass the student this head was written with.")
    try:
        with safe_open(str(head_path), framework="np") as f:
            meta, names = f.metadata() or {}, f.keys()  # a safe_open handle has no `in`
            weight = f.get_tensor("fc_ts.weight") if "fc_ts.weight" in names else None
    except (SafetensorError, OSError) as err:
        raise InspectError(f"{head_path}: not a readable head file ({err}). {rerun}") from err
    recorded, actual = meta.get("student_sha256"), sha256_file(student_path)
    if recorded != actual:
        found = (f"records the student sha256 {recorded[:12]}…" if recorded else
                 "records no student sha256 (it was written before heads were tied to their student)")
        raise InspectError(f"{head_path} is not the head of {student_path}: it {found}, but {student_path} "
                           f"has {actual[:12]}…, so the head comes from another `aekt student` run (or the "
                           f"student was replaced without it). {rerun}")
    return weight, meta


def head_report(student_path: Path, classes: tuple[str, ...], confusion: np.ndarray,
                per_class: list[dict[str, Any]],
                eval_path: Path | None) -> tuple[dict[str, Any], np.ndarray | None]:
    """The serial head FC_TS saved beside the student (row = z_kd class, column = z_cls class) next to
    the teacher's confusions, and the student's per-class test top-1 next to the teacher's p_t."""
    head_path = student_path.with_name("student-head.safetensors")
    out: dict[str, Any] = {"student": str(student_path), "head_file": str(head_path)}
    if eval_path is not None:
        try:
            top1 = json.loads(Path(eval_path).read_text())["per_class_top1"]
        except (ValueError, KeyError, TypeError) as err:
            raise InspectError(f"{eval_path}: not an eval metrics JSON with 'per_class_top1' ({err!r}); "
                               "write it with `aekt evaluate`.") from err
        if not set(top1) & set(classes):
            raise InspectError(f"{eval_path}: per_class_top1 names none of this dataset's classes; "
                               "evaluate the student on the same dataset as the store.")
        out["per_class"] = [{"class": r["class"], "teacher_mean_pt": r["mean_pt"],
                             "teacher_accuracy": r["accuracy"], "student_top1": top1.get(r["class"])}
                            for r in per_class]
    out["head"] = None
    if not head_path.is_file():
        out["message"] = (f"{head_path} not found: `aekt student` writes it beside every student (with no "
                          "weight when the loss has no serial head), so this student was exported before "
                          "that or the file was removed; rerun `aekt student` (or `dvc repro student`) to "
                          "see its head.")
        return out, None
    weight, meta = load_head(head_path, student_path)
    if meta.get("serial_head") == "no":
        out["message"] = (f"{student_path} was trained with loss {meta.get('loss')} and head "
                          f"{meta.get('head')}: no serial head FC_TS to show ({head_path} says so).")
        return out, None
    if weight is None or weight.shape != (len(classes), len(classes)):
        raise InspectError(f"{head_path}: expected key 'fc_ts.weight' of shape {(len(classes),) * 2}, "
                           f"got {None if weight is None else weight.shape}; retrain the student on this "
                           "dataset.")
    eye = np.eye(len(classes))
    out["head"] = {"diag_mean": float(np.diag(weight).mean()),
                   "offdiag_abs_mean": float(np.abs(weight - eye)[eye == 0].mean()),
                   "pairs": [{"z_kd": classes[i], "z_cls": classes[j], "weight": float(weight[i, j]),
                              # FC_TS helps z_kd[i] when images of class j carry teacher mass on i.
                              "teacher_confusions": int(confusion[j, i])}
                             for i, j in top_offdiagonal(weight - eye)]}
    return out, weight


def inspect_store(*, store_path: Location, manifest_path: Path, shards_dir: Location, tau: float = 1.0,
                  classes: Sequence[str] = (), views: Sequence[int] = (), max_shards: int | None = None,
                  student_path: Path | None = None, eval_path: Path | None = None,
                  plots_dir: Path | None = None) -> dict[str, Any]:
    """Read the finished rows of the store and return the report; write plots + CSV to ``plots_dir``."""
    if not tau > 0:
        raise InspectError(f"--tau {tau}: the temperature must be > 0.")
    store = LogitStore.open(store_path)
    manifest = Manifest.load(manifest_path)
    prov = store.provenance
    if manifest.sha256 != prov.manifest_sha256:
        raise CacheError(f"{store_path} was built from a manifest with sha256 {prov.manifest_sha256[:12]}…, "
                         f"but {manifest_path} has {manifest.sha256[:12]}…; pass the manifest the store "
                         "was built from, or rebuild the store with `aekt cache --rebuild`.")
    bad = [v for v in views if not 0 <= v < prov.views]
    if bad:
        raise InspectError(f"--view {bad[0]}: {store_path} holds views 0..{prov.views - 1}.")
    picked = resolve_classes(list(classes), manifest.classes)
    # One snapshot of the markers: a writer may finish more rows while we read.
    done = store.done_mask()
    use_views = sorted(set(views)) or list(range(prov.views))
    shards = pick_shards(prov.num_shards, max_shards)
    data, label_sources = read_views(store, manifest, as_location(shards_dir), done=done, views=use_views,
                                     shards=shards, tau=tau)
    if picked:
        data = data.subset(np.isin(data.label, picked))
        if not len(data.label):
            raise InspectError(f"--class {', '.join(classes)}: no finished sample-views of these classes.")
    teacher, confusion = teacher_report(data, manifest.classes, tau)
    rows_read = int(done[np.ix_(use_views, shards)].sum())
    log.info("%s: %d sample-views read from %d of %d finished rows", store_path, teacher["sample_views"],
             rows_read, int(done.sum()))
    report = {"store": str(store_path), "dataset": prov.dataset, "teacher_arch": prov.teacher_arch,
              "codec": prov.codec, "num_classes": prov.num_classes,
              "rows": {"done": int(done.sum()), "total": int(done.size), "read": rows_read,
                       "complete": bool(done.all())},
              "labels_from": label_sources,
              "views": use_views, "classes": [manifest.classes[c] for c in picked] or None,
              "max_shards": max_shards, **teacher}
    weight = None
    if student_path is not None:
        report["student"], weight = head_report(Path(student_path), manifest.classes, confusion,
                                                teacher["per_class"], eval_path)
    if plots_dir is not None:
        from pipeline.inspect_plots import write_plots

        report["plots"] = [str(p) for p in write_plots(report, Path(plots_dir), head_weight=weight,
                                                       classes=manifest.classes)]
    return report
