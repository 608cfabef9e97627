"""Teacher stage: train a zoo model with CE on the prepared shards, import a checkpoint, or import
one and fine-tune it on the training shards (``teacher.finetune``)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import save_model, sha256_file
from pipeline.augment import Normalization
from pipeline.config import AugmentConfig, LossConfig, TeacherConfig
from pipeline.data import Manifest
from pipeline.data.location import Location
from pipeline.heads import DistillStudent
from pipeline.live import LiveLog
from pipeline.models import (
    CheckpointError,
    build_model,
    classifier_of,
    load_checkpoint,
    load_weights,
    torchvision_weights,
)
from pipeline.models.checkpoints import name_list, nonfinite_tensors
from pipeline.models.registry import check_arch, model_normalization
from pipeline.reports import write_history_csv, write_metrics
from pipeline.stream import ShardStream, StreamSpec
from pipeline.train import TrainJob, check_batch_size, fit, inference_device, is_main_process, predict

log = logging.getLogger(__name__)

# Teacher training draws its augmentations from another stream than the cached views, so the
# views the cache stores are not the exact images the teacher was fitted on.
TEACHER_SEED_OFFSET = 1_000_003


def _import(cfg: TeacherConfig, manifest: Manifest) -> torch.nn.Module:
    model = build_model(cfg.arch, num_classes=manifest.num_classes, in_channels=manifest.channels)
    assert cfg.checkpoint is not None
    if Path(cfg.checkpoint).exists() or "_Weights." not in cfg.checkpoint:
        state = load_checkpoint(cfg.checkpoint)
    else:
        state = torchvision_weights(cfg.arch, cfg.checkpoint)
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(f"{cfg.checkpoint} (params.yaml teacher.checkpoint, {cfg.arch}): {len(bad)} "
                              f"weight tensors hold NaN/inf ({name_list(bad)}); the checkpoint is damaged or was "
                              "saved from a diverged run. Use an intact checkpoint, or remove "
                              "teacher.checkpoint to train the teacher.")
    load_weights(model, state, source=cfg.checkpoint)
    return model


def _fit(cfg: TeacherConfig, backbone: torch.nn.Module, manifest: Manifest, norm: Normalization,
         common: dict[str, Any], test: StreamSpec, progress: bool, desc: str,
         live_dir: Path | None) -> tuple[torch.nn.Module, list]:
    """CE training of ``backbone`` on the train split with ``cfg``'s schedule (from scratch, or a
    fine-tune of imported weights)."""
    check_batch_size(cfg.batch_size, manifest, "teacher.batch_size")
    job = TrainJob(model=DistillStudent(backbone, classifier_of(backbone), manifest.num_classes, "none"),
                   sched=cfg, loss=LossConfig(name="ce", head="none"),
                   train=StreamSpec(split="train", batch_augment=True, **common), test=test, norm=norm,
                   progress=progress, desc=desc, live_dir=live_dir)
    wrapped, history = fit(job)
    return wrapped.backbone, history


def run_teacher(*, manifest_path: Path, shards_dir: Location, model_out: Path, metrics_path: Path,
                history_path: Path, cfg: TeacherConfig, aug: AugmentConfig,
                progress: bool = True, live_dir: Path | None = None) -> dict[str, Any]:
    """Train the teacher, import it (``teacher.checkpoint``), or import and fine-tune it
    (``teacher.finetune``: ``epochs`` more epochs of CE at ``lr`` with the teacher's schedule)."""
    check_arch(cfg.arch, "teacher.arch")
    start = time.perf_counter()
    manifest = Manifest.load(manifest_path)
    norm = model_normalization(cfg.arch, aug.recipe)
    common = dict(manifest_path=manifest_path, shards_dir=shards_dir, recipe=aug.recipe,
                  image_size=aug.size, aug_seed=aug.seed + TEACHER_SEED_OFFSET, views=cfg.epochs, decode=aug.decode,
                  seed=cfg.seed)
    test = StreamSpec(split="test", train=False, **common)
    history: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    if cfg.checkpoint:
        model = _import(cfg, manifest)
        device = inference_device("auto", "teacher")  # an imported ImageNet teacher: 50k val images
        logits, labels = predict(model.to(device), ShardStream(test), device=device,
                                 batch_size=max(256, cfg.batch_size), workers=cfg.workers, norm=norm)
        model.cpu()
        top1 = imported_top1 = float((logits.argmax(1) == labels).mean())
        log.info("imported %s from %s: test top-1 %.4f", cfg.arch, cfg.checkpoint, imported_top1)
        source: dict[str, Any] = {
            "kind": "fine-tuned" if cfg.finetune else "imported", "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": sha256_file(cfg.checkpoint) if Path(cfg.checkpoint).exists() else None,
            "imported_test_top1": imported_top1}
        metrics["imported_top1"] = imported_top1
        if cfg.finetune:
            torch.manual_seed(cfg.seed)
            model, history = _fit(cfg, model, manifest, norm, common, test, progress,
                                  f"teacher[{cfg.arch} fine-tune]", live_dir)
            top1 = history[-1]["test_top1"]
            source["finetune"] = asdict(cfg)
        else:  # nothing trained: the live folder holds the imported weights' score as epoch 0
            LiveLog(live_dir, main=is_main_process(), history=[{"epoch": 0, "test_top1": imported_top1}]).close()
    else:
        torch.manual_seed(cfg.seed)
        backbone = build_model(cfg.arch, num_classes=manifest.num_classes, in_channels=manifest.channels)
        model, history = _fit(cfg, backbone, manifest, norm, common, test, progress, f"teacher[{cfg.arch}]",
                              live_dir)
        top1 = history[-1]["test_top1"]
        source = {"kind": "trained", "config": asdict(cfg)}
    metrics = {"arch": cfg.arch, "test_top1": top1, "epochs": len(history), "source": source["kind"],
               **metrics, "seconds": round(time.perf_counter() - start, 2)}
    if is_main_process():
        card = {"arch": cfg.arch, "num_classes": manifest.num_classes, "in_channels": manifest.channels,
                "classes": list(manifest.classes), "recipe": aug.recipe, "input_norm": norm.to_dict(),
                "dataset": manifest.dataset, "manifest_sha256": manifest.sha256, "test_top1": top1,
                "source": source}
        metrics["sha256"] = save_model(model, model_out, card)["sha256"]
        # A metrics file is a row of `dvc exp show`: scalars to compare only (arch, source and the
        # weights' sha256 are in the card beside the weights).
        write_metrics(metrics_path, {k: metrics[k] for k in ("test_top1", "imported_top1", "epochs", "seconds")
                                     if k in metrics})
        if history:
            write_history_csv(history_path, history)
    return metrics
