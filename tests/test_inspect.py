"""`aekt inspect`: statistics checked against a direct numpy computation on a real (small) store."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from itertools import combinations
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from pipeline.artifacts import save_model
from pipeline.cache.build import build_cache
from pipeline.cache.store import CacheError, LogitStore
from pipeline.config import AugmentConfig, CacheConfig, DataConfig, LossConfig
from pipeline.data import Manifest, prepare, read_shard, sha256_file
from pipeline.inspect_cache import inspect_store
from pipeline.inspect_plots import (
    CSV_NAME,
    HEAD_PNG,
    PNG_NAMES,
    histogram_figure,
    pairs_figure,
    per_class_figure,
    reliability_figure,
    write_plots,
)
from pipeline.inspect_stats import nontarget_entropy, reliability, top_offdiagonal, view_agreement
from pipeline.inspect_text import format_text
from pipeline.models import build_model
from pipeline.student import build_student, export_head
from stages.inspect import main as inspect_cli

VIEWS = 3


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """digits (8 per class and split, shards of 16 -> 5 train shards) cached by a random teacher."""
    root = tmp_path_factory.mktemp("inspect")
    manifest, shards = root / "manifests" / "digits.json", root / "shards"
    prepare(DataConfig(max_per_class=8, shard_size=16), shards_dir=shards, manifest_path=manifest,
            progress=False)
    torch.manual_seed(0)
    teacher = build_model("digits_cnn", num_classes=10, in_channels=1)
    with torch.no_grad():  # spread p_t over (0, 1) instead of a near-uniform random teacher
        teacher.fc.weight.mul_(30.0)
    teacher_path = root / "teacher.safetensors"
    save_model(teacher, teacher_path, {"arch": "digits_cnn", "num_classes": 10, "in_channels": 1, "recipe": "digits"})
    store = root / "digits.zarr"
    build_cache(manifest_path=manifest, shards_dir=shards, teacher_path=teacher_path, store_path=store,
                cfg=CacheConfig(), aug=AugmentConfig(views=VIEWS), progress=False)
    return {"root": root, "manifest": manifest, "shards": shards, "store": store}


def stored(built: dict[str, Path], store_path: Path | None = None) -> dict[str, np.ndarray]:
    """Raw fp16 logits of every finished (view, sample), with labels read straight from the shards."""
    store = LogitStore.open(store_path or built["store"])
    manifest = Manifest.load(built["manifest"])
    done = store.done_mask()
    logits, labels, views, index = [], [], [], []
    for s, info in enumerate(manifest.splits["train"].shards):
        y = np.array([x.label for x in read_shard(built["shards"] / info.name)])
        for v in range(store.provenance.views):
            if done[v, s]:
                logits.append(np.asarray(store.group["logits"][v, info.start:info.end], np.float64))
                labels.append(y)
                views.append(np.full(len(y), v))
                index.append(np.arange(info.start, info.end))
    return {"logits": np.concatenate(logits), "labels": np.concatenate(labels),
            "views": np.concatenate(views), "index": np.concatenate(index)}


def softmax(z: np.ndarray, tau: float) -> np.ndarray:
    e = np.exp(z / tau - (z / tau).max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def guo_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return ece


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_report_matches_numpy(built: dict[str, Path], tau: float) -> None:
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], tau=tau)
    ref = stored(built)
    z, y = ref["logits"], ref["labels"]
    p = softmax(z, tau)
    p_t, pred = p[np.arange(len(y)), y], z.argmax(1)
    assert report["rows"] == {"done": VIEWS * 5, "total": VIEWS * 5, "read": VIEWS * 5, "complete": True}
    assert report["sample_views"] == len(y) == VIEWS * 80 and report["samples"] == 80
    assert report["accuracy"] == pytest.approx((pred == y).mean())
    if tau == 1.0:
        assert 0.05 < p_t.mean() < 0.95 and p_t.std() > 0.1, "fixture teacher should spread p_t"
    assert report["target_confidence"]["mean"] == pytest.approx(p_t.mean(), rel=1e-6)
    assert report["target_confidence"]["q90"] == pytest.approx(np.quantile(p_t, 0.9), rel=1e-6)
    for row in report["per_class"]:
        c = row["index"]
        assert row["mean_pt"] == pytest.approx(p_t[y == c].mean(), rel=1e-6)
        assert [row["q10"], row["q50"], row["q90"]] == pytest.approx(
            np.quantile(p_t[y == c], [0.1, 0.5, 0.9]), rel=1e-6, abs=1e-12)
        assert row["accuracy"] == pytest.approx((pred[y == c] == c).mean())
    assert report["reliability"]["ece"] == pytest.approx(guo_ece(p.max(1), pred == y), rel=1e-6)
    # Non-target distribution by explicit renormalisation (fine in float64 at these logits).
    q = p.copy()
    q[np.arange(len(y)), y] = 0
    q /= q.sum(1, keepdims=True)
    ent = -(q * np.log(np.where(q > 0, q, 1))).sum(1)
    assert report["nontarget_entropy"]["mean"] == pytest.approx(ent.mean(), rel=1e-6)
    counts = Counter((int(a), int(b)) for a, b in zip(y, pred, strict=True) if a != b)
    expected = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [((r["true"], r["predicted"]), r["count"]) for r in report["confused_pairs"]] == \
        [((str(a), str(b)), n) for (a, b), n in expected]
    by_sample = {i: [pred[(ref["index"] == i) & (ref["views"] == v)][0] for v in range(VIEWS)]
                 for i in range(80)}
    agree = report["view_agreement"]
    assert agree["all_views_agree"] == pytest.approx(np.mean([len(set(x)) == 1 for x in by_sample.values()]))
    assert agree["mean_pairwise"] == pytest.approx(np.mean(
        [np.mean([x[a] == x[b] for a, b in combinations(range(VIEWS), 2)]) for x in by_sample.values()]))


def test_labels_come_from_the_store_without_reading_a_shard(built: dict[str, Path], tmp_path: Path) -> None:
    with_shards = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                                shards_dir=built["shards"])
    # No shard folder at all: every label must come from the store.
    without = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                            shards_dir=tmp_path / "no-shards-here")
    assert without["labels_from"] == {"store": 5, "shards": 0}
    assert without == with_shards
    assert "labels: from the store (5 shards; no shard file read)" in format_text(without)
    store, manifest = LogitStore.open(built["store"]), Manifest.load(built["manifest"])
    for s, info in enumerate(manifest.splits["train"].shards):
        np.testing.assert_array_equal(store.read_labels(s),
                                      [x.label for x in read_shard(built["shards"] / info.name)])


def test_a_store_written_before_labels_were_stored_reads_them_from_the_shards(
        built: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "schema1.zarr"
    shutil.copytree(built["store"], old)
    shutil.rmtree(old / "labels")
    zarr.open_group(str(old), mode="r+").attrs["schema_version"] = 1
    report = inspect_store(store_path=old, manifest_path=built["manifest"], shards_dir=built["shards"])
    new = inspect_store(store_path=built["store"], manifest_path=built["manifest"], shards_dir=built["shards"])
    assert report["labels_from"] == {"store": 0, "shards": 5}
    assert {k: v for k, v in report.items() if k not in ("store", "labels_from")} == \
        {k: v for k, v in new.items() if k not in ("store", "labels_from")}
    assert "read from 5 shard files, each checked against its sha256 — the store predates stored labels" \
        in format_text(report)
    with pytest.raises(CacheError, match=r"cannot read.*The labels of shard 0 must come from the shards "
                                         r"because .* written before stores held labels.*--shards-dir"):
        inspect_store(store_path=old, manifest_path=built["manifest"], shards_dir=tmp_path / "none")


def test_filters_class_and_view(built: dict[str, Path]) -> None:
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], classes=["3", "7"], views=[1])
    ref = stored(built)
    keep = (ref["views"] == 1) & np.isin(ref["labels"], [3, 7])
    z, y = ref["logits"][keep], ref["labels"][keep]
    assert report["classes"] == ["3", "7"] and report["views"] == [1]
    assert [r["class"] for r in report["per_class"]] == ["3", "7"]
    assert report["sample_views"] == keep.sum() == 16
    assert report["accuracy"] == pytest.approx((z.argmax(1) == y).mean())
    assert report["view_agreement"] is None  # one view: nothing to agree with
    assert all(r["true"] in ("3", "7") for r in report["confused_pairs"])
    # A name wins over an index; out-of-range indices and unknown names are refused.
    with pytest.raises(CacheError, match="not a class name"):
        inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                      shards_dir=built["shards"], classes=["eleven"])
    with pytest.raises(CacheError, match="holds views 0..2"):
        inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                      shards_dir=built["shards"], views=[VIEWS])


def test_cli_json_text_and_plots(built: dict[str, Path], tmp_path: Path) -> None:
    args = [str(built["store"]), "--manifest", str(built["manifest"]), "--shards-dir", str(built["shards"]),
            "--plots", str(tmp_path / "plots"), "--tau", "2"]
    result = CliRunner().invoke(inspect_cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tau"] == 2.0 and report["rows"]["done"] == VIEWS * 5
    names = sorted(Path(p).name for p in report["plots"])
    assert names == sorted([CSV_NAME, *PNG_NAMES])
    for name in PNG_NAMES:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (tmp_path / "plots" / CSV_NAME).read_text().splitlines()
    assert rows[0] == "class,mean_pt,q10,q50,q90,accuracy,teacher_error" and len(rows) == 11
    first = dict(zip(rows[0].split(","), rows[1].split(","), strict=True))
    assert float(first["teacher_error"]) == pytest.approx(max(1 - float(first["mean_pt"]), 1e-6), rel=1e-4)
    first = rows[1].split(",")
    assert first[0] == "0" and float(first[1]) == pytest.approx(report["per_class"][0]["mean_pt"], rel=1e-5)
    text = CliRunner().invoke(inspect_cli, args)
    assert text.exit_code == 0, text.output
    assert f"{VIEWS * 5} of {VIEWS * 5} (view, shard) rows finished" in text.stdout
    assert "ECE at tau=2 (15 bins)" in text.stdout and "most confused" in text.stdout


def test_partially_written_store(built: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "partial.zarr"
    shutil.copytree(built["store"], copy)
    store = LogitStore.open(copy, mode="r+")
    for v, s in [(0, 1), (2, 1), (1, 4)]:
        store.group["done"][v, s] = 0
    report = inspect_store(store_path=copy, manifest_path=built["manifest"], shards_dir=built["shards"],
                           plots_dir=None)
    ref = stored(built, copy)
    assert report["rows"] == {"done": VIEWS * 5 - 3, "total": VIEWS * 5, "read": VIEWS * 5 - 3,
                              "complete": False}
    assert report["sample_views"] == len(ref["labels"]) == (VIEWS * 5 - 3) * 16
    # Shards 1 and 4 miss views: agreement is over the samples of shards 0, 2, 3 only.
    assert report["view_agreement"]["samples"] == 48
    assert "12 of 15 (view, shard) rows finished" in format_text(report)
    for v in range(VIEWS):
        for s in range(5):
            store.group["done"][v, s] = 0
    with pytest.raises(CacheError, match="no finished"):
        inspect_store(store_path=copy, manifest_path=built["manifest"], shards_dir=built["shards"])


def test_max_shards_reads_an_even_subset(built: dict[str, Path]) -> None:
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], max_shards=2)
    assert report["rows"]["read"] == 2 * VIEWS and report["rows"]["done"] == 5 * VIEWS
    assert report["sample_views"] == 2 * VIEWS * 16 and report["samples"] == 32  # shards 0 and 4


def test_topk_codec_decodes_with_shard_labels(built: dict[str, Path]) -> None:
    """topk stores the target logit separately, so decoding needs each shard's labels."""
    store_path = built["root"] / "topk.zarr"
    build_cache(manifest_path=built["manifest"], shards_dir=built["shards"],
                teacher_path=built["root"] / "teacher.safetensors", store_path=store_path,
                cfg=CacheConfig(codec="topk", topk=3), aug=AugmentConfig(views=1), progress=False)
    report = inspect_store(store_path=store_path, manifest_path=built["manifest"],
                           shards_dir=built["shards"])
    store, manifest = LogitStore.open(store_path), Manifest.load(built["manifest"])
    p_t = []
    for info in manifest.splits["train"].shards:
        y = np.array([x.label for x in read_shard(built["shards"] / info.name)])
        logits, _ = store.read_row(0, int(info.start // 16), y)
        p_t.append(softmax(logits.astype(np.float64), 1.0)[np.arange(len(y)), y])
    assert report["codec"] == "topk"
    assert report["target_confidence"]["mean"] == pytest.approx(np.concatenate(p_t).mean(), rel=1e-6)


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "file"])
def test_non_store_path_fails_clearly(built: dict[str, Path], tmp_path: Path, kind: str) -> None:
    path = tmp_path / "not-a-store"
    if kind == "empty_dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    result = CliRunner().invoke(inspect_cli, [str(path), "--manifest", str(built["manifest"]),
                                              "--plots", str(tmp_path / "plots")])
    assert result.exit_code != 0
    assert str(path) in result.output and "not a logit store" in result.output


def test_manifest_mismatch_refused(built: dict[str, Path], tmp_path: Path) -> None:
    manifest = Manifest.load(built["manifest"])
    other = Manifest.build(dataset=manifest.dataset, source={**manifest.source, "edited": True},
                           classes=manifest.classes, channels=manifest.channels,
                           image_format=manifest.image_format, shard_size=manifest.shard_size,
                           splits=manifest.splits)
    other.save(tmp_path / "other.json")
    result = CliRunner().invoke(inspect_cli, [str(built["store"]), "--manifest", str(tmp_path / "other.json"),
                                              "--shards-dir", str(built["shards"])])
    assert result.exit_code != 0 and "was built from a manifest with sha256" in result.output
    assert str(tmp_path / "other.json") in result.output


def export_student(folder: Path, manifest: Path, loss: dict, weight: np.ndarray | None = None,
                   seed: int = 0) -> Path:
    """A digits student saved and its head exported as `aekt student` does (FC_TS set to ``weight``)."""
    cfg = LossConfig.from_params(loss)
    model = build_student("digits_mlp", Manifest.load(manifest), cfg, seed)
    if weight is not None:
        with torch.no_grad():
            model.serial_weight.copy_(torch.from_numpy(weight))
    folder.mkdir(parents=True, exist_ok=True)
    student = folder / "student.safetensors"
    card = save_model(model.backbone, student, {"arch": "digits_mlp", "num_classes": 10, "in_channels": 1,
                                                "recipe": "digits"})
    export_head(student, card["sha256"], model, cfg)
    return student


def test_student_head_and_eval(built: dict[str, Path], tmp_path: Path) -> None:
    weight = np.eye(10, dtype=np.float32)
    weight[1, 7], weight[3, 8], weight[0, 5] = 0.30, -0.20, 0.05
    student = export_student(tmp_path, built["manifest"], {"name": "aekt", "head": "serial"}, weight)
    metrics = tmp_path / "eval.json"
    metrics.write_text(json.dumps({"per_class_top1": {str(c): c / 10 for c in range(10)}}))
    args = [str(built["store"]), "--manifest", str(built["manifest"]), "--shards-dir", str(built["shards"]),
            "--student", str(student), "--eval-metrics", str(metrics), "--plots", str(tmp_path / "plots")]
    result = CliRunner().invoke(inspect_cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["student"]
    pairs = [(p["z_kd"], p["z_cls"], p["weight"]) for p in out["head"]["pairs"]]
    assert pairs == [("1", "7", pytest.approx(0.3)), ("3", "8", pytest.approx(-0.2)),
                     ("0", "5", pytest.approx(0.05))]
    ref = stored(built)
    pred = ref["logits"].argmax(1)
    # z_kd = 1 borrows from z_cls = 7: teacher views labelled 7 whose argmax is 1.
    assert out["head"]["pairs"][0]["teacher_confusions"] == int(((ref["labels"] == 7) & (pred == 1)).sum())
    assert [r["student_top1"] for r in out["per_class"]] == pytest.approx([c / 10 for c in range(10)])
    assert (tmp_path / "plots" / HEAD_PNG).is_file()
    assert "1 <- 7: W +0.3000" in format_text(json.loads(result.stdout))


@pytest.mark.parametrize(("loss", "fragment"), [
    ({"name": "kd"}, "trained with loss kd and head none: no serial head FC_TS to show"),
    ({"name": "aekt", "head": "parallel"}, "trained with loss aekt and head parallel: no serial head"),
    ({"name": "aekt", "head": "none"}, "trained with loss aekt and head none: no serial head"),
])
def test_a_student_without_a_serial_head_still_gets_its_head_file(built: dict[str, Path], tmp_path: Path,
                                                                  loss: dict, fragment: str) -> None:
    student = export_student(tmp_path, built["manifest"], loss)
    head = tmp_path / "student-head.safetensors"
    assert head.is_file() and not load_file(str(head))  # metadata only, no tensor
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], student_path=student)
    assert report["student"]["head"] is None and fragment in format_text(report)
    assert str(student) in report["student"]["message"]


def test_a_head_from_another_student_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    """The head beside a student was written by another run: refuse instead of showing it."""
    student = export_student(tmp_path / "a", built["manifest"], {"name": "aekt", "head": "serial"})
    other = export_student(tmp_path / "b", built["manifest"], {"name": "aekt", "head": "serial"}, seed=1)
    shutil.copy(other.with_name("student-head.safetensors"), student.with_name("student-head.safetensors"))
    args = [str(built["store"]), "--manifest", str(built["manifest"]), "--shards-dir", str(built["shards"]),
            "--student", str(student), "--plots", str(tmp_path / "plots")]
    result = CliRunner().invoke(inspect_cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.split("Error: ", 1)[1].strip()
    assert "\n" not in message, message  # one paragraph
    head = student.with_name("student-head.safetensors")
    for fragment in (f"{head} is not the head of {student}", f"records the student sha256 "
                     f"{sha256_file(other)[:12]}", f"has {sha256_file(student)[:12]}", "another `aekt student` run",
                     "Rerun `aekt student` (or `dvc repro student`)"):
        assert fragment in message, f"{fragment!r} not in {message}"
    assert not (tmp_path / "plots").exists()
    # A head written before heads recorded their student is refused the same way.
    save_file({"fc_ts.weight": np.eye(10, dtype=np.float32)}, str(head))
    result = CliRunner().invoke(inspect_cli, args)
    assert result.exit_code == 1 and "records no student sha256" in result.output
    # No head file at all: a message, not an error (the per-class comparison still works).
    head.unlink()
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], student_path=student)
    assert report["student"]["head"] is None
    assert "not found: `aekt student` writes it beside every student" in format_text(report)
    assert "rerun `aekt student`" in report["student"]["message"]


# ---- pure functions ------------------------------------------------------------------------------
def test_reliability_bins_are_left_open() -> None:
    conf = np.array([0.0, 1 / 3, 0.34, 1.0])
    correct = np.array([False, True, True, True])
    rel = reliability(conf, correct, bins=3)
    assert [b["count"] for b in rel["bins"]] == [2, 1, 1]  # 1/3 belongs to (0, 1/3]
    assert rel["ece"] == pytest.approx(guo_ece(conf, correct, bins=3))


def test_nontarget_entropy_is_stable_and_ignores_target() -> None:
    logits = np.array([[1000.0, 0.0, 0.0, 0.0], [0.0, 5.0, 5.0, 5.0]])
    ent = nontarget_entropy(logits, np.array([0, 0]), tau=1.0)
    assert np.isfinite(ent).all()
    assert ent == pytest.approx([np.log(3), np.log(3)])  # uniform over the three non-targets


def test_top_offdiagonal_and_agreement() -> None:
    m = np.array([[9, 2, 0], [2, 9, 5], [0, 1, 9]])
    assert top_offdiagonal(m, top=3) == [(1, 2), (0, 1), (1, 0)]
    assert view_agreement(np.array([[0, 1, 2]])) is None
    agree = view_agreement(np.array([[0, 1, 2], [0, 1, 1], [0, 2, 2]]))
    assert agree["all_views_agree"] == pytest.approx(1 / 3)
    assert agree["mean_pairwise"] == pytest.approx(np.mean([1, 1 / 3, 1 / 3]))


def test_many_classes_plot_shows_extremes(tmp_path: Path) -> None:
    classes = tuple(f"class_{c:03d}" for c in range(100))
    rng = np.random.default_rng(0)
    per_class = [{"class": name, "index": c, "count": 5, "mean_pt": float(m), "q10": float(m) / 2,
                  "q50": float(m), "q90": min(1.0, float(m) * 1.1), "accuracy": float(m), "nt_entropy": 1.0}
                 for c, (name, m) in enumerate(zip(classes, rng.uniform(0.1, 0.9, 100), strict=True))]
    report = {"dataset": "synthetic", "teacher_arch": "none", "sample_views": 500, "tau": 1.0,
              "per_class": per_class, "target_confidence": {"mean": 0.5, "q50": 0.5},
              "confidence_histogram": {"edges": np.linspace(0, 1, 21).tolist(), "correct": [1] * 20,
                                       "wrong": [0] * 20},
              "reliability": reliability(rng.uniform(0, 1, 500), rng.uniform(0, 1, 500) > 0.5),
              "confused_pairs": []}
    paths = write_plots(report, tmp_path, head_weight=None, classes=classes)
    assert [p.name for p in paths] == [CSV_NAME, *PNG_NAMES]
    assert len((tmp_path / CSV_NAME).read_text().splitlines()) == 101


# ---- what the PNGs show ---------------------------------------------------------------------------
def synthetic_report(num_classes: int, *, counts: int = 1) -> dict:
    """A report with ``num_classes`` classes and ``counts`` as the size of every count (1: tiny)."""
    rng = np.random.default_rng(0)
    classes = [f"class_{c:03d}" for c in range(num_classes)]
    per_class = [{"class": name, "index": c, "count": 5, "mean_pt": float(m), "q10": float(m) / 2,
                  "q50": float(m), "q90": min(1.0, float(m) * 1.1), "accuracy": float(m), "nt_entropy": 1.0}
                 for c, (name, m) in enumerate(zip(classes, rng.uniform(0.1, 0.9, num_classes), strict=True))]
    conf = rng.uniform(0, 1, 30 * counts)
    return {"dataset": "synthetic", "teacher_arch": "none", "sample_views": 30 * counts, "tau": 1.0,
            "per_class": per_class, "target_confidence": {"mean": 0.5, "q50": 0.5},
            "confidence_histogram": {"edges": np.linspace(0, 1, 21).tolist(),
                                     "correct": [counts * (i % 3) for i in range(20)], "wrong": [counts] * 20},
            "reliability": reliability(conf, rng.uniform(0, 1, len(conf)) > 0.5),
            "confused_pairs": [{"true": classes[i], "predicted": classes[i + 1], "count": counts * (3 - i),
                                "share_of_true": 0.1} for i in range(3)]}


def top_to_bottom_labels(fig: plt.Figure) -> list[str]:
    """The y tick labels of the figure's first axes as a reader sees them, top to bottom."""
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [(ax.transData.transform((1, y))[1], t.get_text())
             for y, t in zip(ax.get_yticks(), ax.get_yticklabels(), strict=True)]
    return [text for _, text in sorted(ticks, reverse=True)]


def text_table_classes(text: str) -> list[str]:
    """The class column of the text report's per-class table, top to bottom."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per class, sorted by mean p_t")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip():
            return rows
        rows.append(line.split()[0])
    return rows


def test_per_class_plot_lists_classes_in_the_text_order(built: dict[str, Path]) -> None:
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"])
    report["plots"] = []
    text_order = text_table_classes(format_text(report))
    assert len(text_order) == 10 and text_order == [r["class"] for r in
                                                    sorted(report["per_class"], key=lambda r: r["mean_pt"])]
    fig = per_class_figure(report)
    try:
        assert top_to_bottom_labels(fig) == text_order
        assert fig.axes[0].get_xscale() == "logit"  # 0.9, 0.99, 0.999 evenly spaced
    finally:
        plt.close(fig)
    # Above 60 classes the PNG shows the 30 lowest and highest, the text the 10 lowest and highest:
    # the text's rows appear in the PNG in the same order.
    many = synthetic_report(100)
    fig = per_class_figure(many)
    try:
        shown = top_to_bottom_labels(fig)
    finally:
        plt.close(fig)
    ranked = [r["class"] for r in sorted(many["per_class"], key=lambda r: r["mean_pt"])]
    assert shown == ranked[:30] + ranked[-30:]
    text_rows = text_table_classes(format_text({**report, "per_class": many["per_class"]}))
    assert text_rows == ranked[:10] + ranked[-10:]
    assert [c for c in shown if c in text_rows] == text_rows


def _integer_tick_labels(ax: plt.Axes, which: str) -> list[int]:
    """The labelled major ticks of a count axis inside its view, as integers (fails on 0.5, 2.5, ...)."""
    axis = getattr(ax, f"{which}axis")
    lo, hi = sorted(getattr(ax, f"get_{which}lim")())
    labels = [t.get_text().replace(",", "") for t, v in zip(axis.get_ticklabels(), axis.get_majorticklocs(),
                                                            strict=True) if lo <= v <= hi and t.get_text()]
    assert labels, f"no labelled ticks on the {which} axis"
    assert all(v == int(v) for v in axis.get_majorticklocs() if lo <= v <= hi)
    return [int(text) for text in labels]


@pytest.mark.parametrize("counts", [1, 1000])
def test_count_axes_have_integer_ticks(counts: int) -> None:
    report = synthetic_report(10, counts=counts)
    figures = {"histogram": (histogram_figure(report), 0, "y"), "reliability": (reliability_figure(report), 1, "y"),
               "pairs": (pairs_figure(report), 0, "x")}
    try:
        for name, (fig, index, which) in figures.items():
            fig.canvas.draw()
            ticks = _integer_tick_labels(fig.axes[index], which)
            assert len(ticks) >= 2, (name, ticks)
    finally:
        for fig, _, _ in figures.values():
            plt.close(fig)


def _overlaps(a, b) -> bool:  # two display bounding boxes
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_reliability_bar_top_is_accuracy_and_every_bin_is_labelled(built: dict[str, Path]) -> None:
    report = inspect_store(store_path=built["store"], manifest_path=built["manifest"],
                           shards_dir=built["shards"], tau=2.0)
    bins = report["reliability"]["bins"]
    fig = reliability_figure(report)
    try:
        fig.canvas.draw()
        ax, counts_ax = fig.axes
        renderer = fig.canvas.get_renderer()
        legend = ax.get_legend()
        assert not _overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
        names = [t.get_text() for t in legend.get_texts()]
        assert any("accuracy" in n for n in names) and any("confidence" in n for n in names)
        assert any("gap" in n for n in names) and any("calibration" in n for n in names)
        seen = [b for b in bins if b["count"]]
        accuracy_bars, gap_bars = ax.containers
        assert [r.get_height() for r in accuracy_bars] == pytest.approx([b["accuracy"] for b in seen])
        for bar, gap, b in zip(accuracy_bars, gap_bars, seen, strict=True):
            # The gap has a strip of its own: it never covers the accuracy bar's top.
            assert gap.get_x() >= bar.get_x() + bar.get_width() - 1e-12
            assert gap.get_y() == pytest.approx(min(b["accuracy"], b["confidence"]))
            assert gap.get_y() + gap.get_height() == pytest.approx(max(b["accuracy"], b["confidence"]))
        # Every bin's count is written under it, empty bins as 0.
        assert [t.get_text() for t in counts_ax.texts] == [f"{b['count']:,}" for b in bins]
    finally:
        plt.close(fig)
    fig = histogram_figure(report)
    try:  # the histogram's legend sits beside the bars, never over the tallest
        fig.canvas.draw()
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        assert not _overlaps(ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer))
    finally:
        plt.close(fig)
