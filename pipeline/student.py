"""Stage 2: train the student from shards + the Zarr cache (or an online teacher)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline.artifacts import load_model, read_card, save_model
from pipeline.augment import Normalization
from pipeline.cache.build import expected_provenance
from pipeline.cache.store import CacheError, LogitStore
from pipeline.config import AugmentConfig, CacheConfig, LossConfig, StudentConfig, TrainConfig
from pipeline.data import Manifest
from pipeline.data.location import Location
from pipeline.heads import DistillStudent
from pipeline.models import build_model, classifier_of
from pipeline.models.registry import check_arch, model_normalization
from pipeline.outputs import atomic_path
from pipeline.reports import write_history_csv, write_metrics
from pipeline.stream import StreamSpec
from pipeline.train import TrainJob, check_batch_size, fit, is_main_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudentPaths:
    manifest: Path
    shards_dir: Location
    teacher: Path  # models/teacher.safetensors (its card is checked against the cache)
    store: Location
    model_out: Path  # models/student.safetensors
    metrics: Path
    history: Path
    ckpt_dir: Path
    live: Path | None = None  # dvclive folder: live metrics while it trains (pipeline/live.py)


def check_store(paths: StudentPaths, manifest: Manifest, cache: CacheConfig, aug: AugmentConfig,
                train: TrainConfig) -> LogitStore:
    """Refuse a store that was not built from these inputs, or that is unfinished."""
    store = LogitStore.open(paths.store)
    # the device fit() trains on: the pixel source must be the store's (pipeline/device_decode.py)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    expected = expected_provenance(manifest, read_card(paths.teacher), cache, aug, device_type)
    diff = store.provenance.mismatches(expected)
    if diff:
        raise CacheError(f"{paths.store}: the cache does not match this run's inputs — " + "; ".join(diff)
                         + ". Rebuild it with `dvc repro cache` (or `aekt cache --rebuild`).")
    done = store.done_mask()
    if not done.all():
        raise CacheError(f"{paths.store}: {int((~done).sum())} of {done.size} (view, shard) rows are "
                         "unfinished; rerun `aekt cache` (it resumes) before training the student.")
    if train.view_policy == "cycle" and train.epochs > store.provenance.views:
        log.warning("%d epochs over %d cached views: view_policy=cycle reuses each view ~%.1f times",
                    train.epochs, store.provenance.views, train.epochs / store.provenance.views)
    return store


def teacher_sha256(store: LogitStore | None, online_card: dict[str, Any] | None) -> str | None:
    """The teacher this run distils from: the online one's, or the one the store was built from."""
    if online_card is not None:
        return online_card["sha256"]
    return store.provenance.teacher_sha256 if store is not None else None


def build_student(arch: str, manifest: Manifest, loss: LossConfig, seed: int) -> DistillStudent:
    torch.manual_seed(seed)
    backbone = build_model(arch, num_classes=manifest.num_classes, in_channels=manifest.channels)
    # The serialization head is part of AEKT; baselines (KD, DKD, ...) train without one.
    return DistillStudent(backbone, classifier_of(backbone), manifest.num_classes, loss.effective_head)


def loss_card(loss: LossConfig) -> dict[str, Any]:
    """The loss as trained, for the model card: ``head`` is the head actually built (baselines
    have none, whatever params.yaml's ``loss.head`` says), and the warm-up as applied."""
    return {**loss.to_dict(), "head": loss.effective_head, "warmup_applied": loss.uses_warmup()}


def fingerprint(*parts: Any) -> str:
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# The schedule keys a sweep varies most, echoed in the metrics file so `dvc exp show` and scripts
# reading metrics/student.json see what ran beside what it scored (the card has the full config).
SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "lr_warmup_epochs")


def student_metrics(history: list[dict[str, Any]], *, loss: LossConfig, train: TrainConfig, seconds: float,
                    teacher_mode: str) -> dict[str, Any]:
    """The scalars users compare across runs. Per-term losses, gradient norms, w statistics and
    per-epoch speed are in the history CSV (plots/train.csv), not here: a metrics file is a table row."""
    final, best = history[-1], max(history, key=lambda r: r["test_top1"])
    return {"final_top1": final["test_top1"], "final_top5": final["test_top5"],
            "best_top1": best["test_top1"], "best_epoch": best["epoch"], "epochs": len(history),
            "final_loss": final["loss/total"],
            "seconds": round(seconds, 2), "loss": loss.name, "teacher_mode": teacher_mode,
            "train": {k: getattr(train, k) for k in SCHEDULE_KEYS}}


HEAD_FILE = "student-head.safetensors"  # beside the student, for `aekt inspect --student`


def export_head(student_path: Path, student_sha256: str, model: DistillStudent, loss: LossConfig) -> None:
    """Write the training-only serial head FC_TS beside the student, always: for a loss without one
    (a baseline, ``loss.head`` parallel or none) a file with no tensor. Its metadata ties it to the
    student written beside it (that file's sha256) and says which head the loss used, so inspect can
    refuse a head left there by another run."""
    weight = model.serial_weight
    tensors = {} if weight is None else {"fc_ts.weight": weight.detach().cpu().contiguous()}
    metadata = {"student_file": student_path.name, "student_sha256": student_sha256, "loss": loss.name,
                "head": loss.effective_head, "serial_head": "yes" if weight is not None else "no"}
    with atomic_path(student_path.with_name(HEAD_FILE)) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, metadata=metadata))  # a full disk raises OSError


def train_student(paths: StudentPaths, *, student: StudentConfig, loss: LossConfig, train: TrainConfig,
                  cache: CacheConfig, aug: AugmentConfig, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    check_arch(student.arch, "student.arch")
    manifest = Manifest.load(paths.manifest)
    check_batch_size(train.batch_size, manifest, "train.batch_size")
    online = train.teacher == "online" or loss.name == "ce"
    store = None if online else check_store(paths, manifest, cache, aug, train)
    online_teacher = train.teacher == "online" and loss.name != "ce"
    teacher, teacher_card = load_model(paths.teacher) if online_teacher else (None, None)
    norm = model_normalization(student.arch, aug.recipe)  # the student normalises for itself
    views = store.provenance.views if store else aug.views
    common = dict(manifest_path=paths.manifest, shards_dir=paths.shards_dir, recipe=aug.recipe,
                  image_size=aug.size, aug_seed=aug.seed, views=views, seed=train.seed, decode=aug.decode)
    job = TrainJob(
        model=build_student(student.arch, manifest, loss, train.seed), sched=train, loss=loss,
        train=StreamSpec(split="train", view_policy=train.view_policy, batch_augment=True,
                         store_path=None if store is None else paths.store, **common),
        test=StreamSpec(split="test", train=False, **common), norm=norm, teacher=teacher,
        teacher_norm=None if teacher_card is None else Normalization.from_card(teacher_card),
        ckpt_dir=paths.ckpt_dir, checkpoint_every=train.checkpoint_every, resume=resume,
        fingerprint=fingerprint(student, loss, train, cache, aug, manifest.sha256), progress=progress,
        inputs={**{f"params.yaml {cfg.SECTION}": fingerprint(cfg) for cfg in (student, loss, train, cache, aug)},
                "manifest sha256": manifest.sha256, "teacher sha256": str(teacher_sha256(store, teacher_card))},
        desc=f"student[{loss.name}]", compile_loss=train.compile_loss, live_dir=paths.live)
    start = time.perf_counter()
    model, history = fit(job)
    metrics = student_metrics(history, loss=loss, train=train, seconds=time.perf_counter() - start,
                              teacher_mode="online" if teacher is not None else
                              ("none" if loss.name == "ce" else "cached"))
    final = history[-1]
    if is_main_process():
        card = {"arch": student.arch, "num_classes": manifest.num_classes,
                "in_channels": manifest.channels, "classes": list(manifest.classes),
                "recipe": aug.recipe, "input_norm": norm.to_dict(), "image_size": aug.size,
                "dataset": manifest.dataset,
                "manifest_sha256": manifest.sha256, "loss": loss_card(loss), "train": train.to_dict(),
                "cache": None if store is None else asdict(store.provenance),
                "test_top1": final["test_top1"]}
        saved = save_model(model.backbone, paths.model_out, card)  # the head is dropped: z_cls only
        export_head(paths.model_out, saved["sha256"], model, loss)
        write_metrics(paths.metrics, metrics)
        write_history_csv(paths.history, history)
    return metrics
