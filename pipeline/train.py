"""One training loop for teacher and student: Accelerate, streamed shards, cached or online teacher.

``fit`` runs epochs of ``train_epoch`` + ``evaluate`` and checkpoints; the loss terms come back as a
named dict from ``compute_loss`` and are logged per epoch. The teacher (online mode) is put in
``eval()`` in exactly one place, ``fit``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pipeline import augment
from pipeline.config import ConfigError, LossConfig, ScheduleConfig
from pipeline.data import Manifest
from pipeline.distributed import check_same_inputs, make_accelerator, share_optimizer_state
from pipeline.heads import DistillStudent, build_param_groups
from pipeline.live import LiveLog, StepSeries, all_ranks, gather_sums, merge_points
from pipeline.losses import TermsFn, compiled_loss_terms, compute_loss, describe_loss, loss_warmup
from pipeline.progress import Progress, RunClock, format_eta
from pipeline.run_state import resume_from_main, save_checkpoint
from pipeline.stream import ShardStream, StreamSpec, batch_images
from pipeline.train_checks import check_finite, check_finite_weights, probe_term_grads

log = logging.getLogger(__name__)


def lr_at(progress: float, sched: ScheduleConfig) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1] of the run (pure function of the step):
    a linear warm-up over the first ``lr_warmup_epochs``, times the schedule."""
    warm = sched.lr_warmup_epochs / sched.epochs
    ramp = min(1.0, progress / warm) if warm > 0 else 1.0
    if sched.lr_schedule == "cosine":
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if sched.lr_schedule == "multistep":
        return ramp * sched.lr_gamma ** sum(progress >= m for m in sched.milestones)
    return ramp


@dataclass
class TrainJob:
    model: DistillStudent
    sched: ScheduleConfig
    loss: LossConfig
    train: StreamSpec
    test: StreamSpec
    # Input normalisation of the model trained (its own: Normalization docs) and of the online
    # teacher; None = the recipe's statistics, the normalisation of every model trained here.
    norm: augment.Normalization | None = None
    teacher: torch.nn.Module | None = None  # online KD: run the teacher each step
    teacher_norm: augment.Normalization | None = None
    ckpt_dir: Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    fingerprint: str = ""
    inputs: dict[str, str] = field(default_factory=dict)  # name -> digest; every rank must agree
    progress: bool = True
    desc: str = "train"
    compile_loss: bool = False  # train.compile_loss
    history: list[dict[str, Any]] = field(default_factory=list)
    live_dir: Path | None = None  # dvclive folder (pipeline/live.py); None = no live metrics
    live: LiveLog = field(default_factory=lambda: LiveLog(None, main=False, history=[]), repr=False)
    terms_fn: TermsFn | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.norm = self.norm or augment.Normalization.of_recipe(self.train.recipe)
        self.teacher_norm = self.teacher_norm or augment.Normalization.of_recipe(self.train.recipe)
        if self.compile_loss and self.terms_fn is None:
            self.terms_fn = compiled_loss_terms(self.loss)


def check_batch_size(batch_size: int, manifest: Manifest, key: str) -> None:
    """A batch larger than the training split would make every epoch one short step (and say
    nothing): refuse it before loaders are built."""
    split = manifest.splits.get("train")
    samples = split.num_samples if split is not None else 0
    if batch_size > samples:
        raise ConfigError(f"params.yaml {key}: {batch_size} is larger than the training split ({samples} "
                          f"samples in {manifest.dataset!r}); set {key} to at most {samples} (typically "
                          "64-256).")


def build_loader(stream: ShardStream, batch_size: int, workers: int, pin: bool) -> DataLoader:
    # Capped at the split's size: a huge eval.batch_size gives the same batches.
    batch_size = max(1, min(batch_size, stream.num_samples()))
    # Whole batches from the workers (stream.BatchStream): the same batches the default collate of
    # per-sample dicts would build, without a dict and a collate per sample.
    return DataLoader(stream.batched(batch_size), batch_size=None, num_workers=workers, pin_memory=pin,
                      persistent_workers=False)


def to_device_layout(x: torch.Tensor) -> torch.Tensor:
    """channels_last on CUDA: convolutions run on tensor cores without layout transposes."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.ndim == 4 else x


def train_step(job: TrainJob, accelerator: Any, model: torch.nn.Module, optimizer: Any, batch: dict,
               warm: float, probe_grads: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                        dict[str, torch.Tensor]]:
    """One optimiser step; returns detached loss terms and gradient norms (device tensors) and stats."""
    device = accelerator.device
    assert job.norm is not None and job.teacher_norm is not None
    # deferred augmentation (stream batch_augment) or decoding (augment.decode: device) happen here
    images = batch_images(batch, job.train, channels=len(job.norm.mean), device=device)
    x = to_device_layout(job.norm(images))
    y = batch["label"].to(device, non_blocking=True)
    with accelerator.accumulate(model), accelerator.autocast():
        z_cls, z_kd = model(x)
        teacher = None
        if job.loss.name != "ce":
            if job.teacher is not None:
                x_t = x if job.teacher_norm == job.norm else to_device_layout(job.teacher_norm(images))
                with torch.no_grad():
                    teacher = job.teacher(x_t).float()
            else:
                teacher = batch["teacher"].to(device, non_blocking=True)
        z_cls, z_kd = z_cls.float(), z_kd.float()
        out = compute_loss(job.loss, z_cls=z_cls, z_kd=z_kd, teacher_logits=teacher, targets=y, warmup=warm,
                           terms_fn=job.terms_fn)
        grads = probe_term_grads(job.loss, z_cls, z_kd, teacher, y, warm) if probe_grads else {}
        accelerator.backward(out.total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in out.terms.items()}, out.stats, grads


# Host syncs cost at small batch on a GPU: check finiteness and probe gradient norms periodically.
NAN_CHECK_EVERY = 25
GRAD_PROBE_EVERY = 10


def train_epoch(job: TrainJob, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                stream: ShardStream, epoch: int, clock: RunClock | None = None) -> dict[str, float]:
    stream.set_epoch(epoch)
    sched = job.sched
    world = accelerator.num_processes
    n_local = stream.num_samples()
    # One schedule for all ranks: the most steps any rank takes (shards are uneven), so every rank
    # applies the same lr to the same all-reduced gradient at each step.
    steps = max(1, *(math.ceil(n / sched.batch_size) for n in all_ranks(n_local, world)))
    warm = loss_warmup(job.loss, epoch)  # epochs count from 1: lambda(1) = 1 / warmup_epochs
    term_sums: dict[str, torch.Tensor] = {}
    grad_sums: dict[str, torch.Tensor] = {}
    stat_sums: dict[str, torch.Tensor | float] = {}  # summed on the device: no per-step host sync
    series = StepSeries.for_epoch(steps)
    seen, probes, start, step = 0, 0, time.perf_counter(), -1
    loader = build_loader(stream, sched.batch_size, sched.workers, accelerator.device.type == "cuda")
    # Ranks may hold different sample counts (whole shards per rank): DDP's Join lets a rank that
    # ran out shadow the others' gradient all-reduces instead of hanging (Accelerate's
    # join_uneven_inputs is a no-op on CPU/gloo, so use torch's directly). The steps after a rank
    # joined average gradients over the full world size: those few updates are damped, nothing is
    # skipped or seen twice.
    joined = Join([model]) if isinstance(model, DistributedDataParallel) else nullcontext()
    bar = Progress(n_local, f"{job.desc} epoch {epoch}/{sched.epochs}", "img", bar=job.progress,
                   main=accelerator.is_main_process, suffix=clock and clock.suffix(epoch), logger=log)
    with joined, bar:
        for step, batch in enumerate(loader):
            scale = lr_at((epoch - 1 + step / steps) / sched.epochs, sched)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * scale
            terms, stats, grads = train_step(job, accelerator, model, optimizer, batch, warm,
                                             probe_grads=step % GRAD_PROBE_EVERY == 0)
            b = len(batch["label"])
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0) + v * b
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v * b
            for k, v in grads.items():
                grad_sums[k] = grad_sums.get(k, 0) + v
            probes += bool(grads)
            seen += b
            if (step + 1) % series.every == 0:
                live_point(job, series, (epoch - 1) * steps + step + 1, term_sums, seen, optimizer, world)
            bar.update(b)
            if step % NAN_CHECK_EVERY == 0:
                check_finite(term_sums, epoch, step, sched.SECTION or "train")
    check_finite(term_sums, epoch, step, sched.SECTION or "train")
    share_optimizer_state(optimizer, step + 1, rank=accelerator.process_index, world=world)
    live_point(job, series, epoch * steps, term_sums, seen, optimizer, world)
    if world > 1:
        job.live.points(series.merged(world))
    return epoch_row(term_sums, stat_sums, grad_sums, seen=seen, probes=probes, world=world,
                     seconds=time.perf_counter() - start, epoch=epoch, lr=optimizer.param_groups[0]["lr"])


def live_point(job: TrainJob, series: StepSeries, global_step: int, term_sums: dict[str, torch.Tensor],
               seen: int, optimizer: Any, world: int) -> None:
    """Close the step series' window; with one rank it goes live at once, with several the points
    are merged at the epoch's end (a collective here could hang on uneven shards)."""
    sums = {f"loss/{k}": v for k, v in term_sums.items()}
    point = series.close_window(global_step, sums | {"loss/total": sum(sums.values())}, seen,
                                {"lr": optimizer.param_groups[0]["lr"]})
    if point is not None and world == 1:
        job.live.points(merge_points([[point]]))


def epoch_row(term_sums: dict[str, Any], stat_sums: dict[str, Any], grad_sums: dict[str, Any], *,
              seen: int, probes: int, seconds: float, world: int, epoch: int, lr: float) -> dict[str, float]:
    """The epoch's means over the samples of every rank (one gather; every rank must call it)."""
    local = {f"loss/{k}": float(v) for k, v in term_sums.items()} | {k: float(v) for k, v in stat_sums.items()}
    local |= {f"grad/{k}": float(v) for k, v in grad_sums.items()}
    total = gather_sums(local | {"_seen": seen, "_probes": probes, "_seconds": seconds}, world)
    n, p = max(total.pop("_seen"), 1), max(total.pop("_probes"), 1)
    row: dict[str, float] = {k: v / n for k, v in total.items() if k.startswith("loss/")}
    row["loss/total"] = sum(row.values())
    row.update({k: v / n for k, v in total.items() if not k.startswith(("loss/", "grad/", "_"))})
    row.update({k.removeprefix("grad/"): v / p for k, v in total.items() if k.startswith("grad/")})
    row.update(epoch=epoch, lr=lr, samples=int(n), img_per_s=float(n / (total["_seconds"] / world)))
    return row


@torch.no_grad()
def predict(model: torch.nn.Module, stream: ShardStream, *, device: torch.device, batch_size: int,
            norm: augment.Normalization, workers: int = 0, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[n, C]`` (z_cls for a DistillStudent) and labels ``[n]`` of this rank's shards;
    ``norm`` is the model's input normalisation; ``desc`` names the pass in progress records."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    bar = Progress(stream.num_samples(), desc or "predict", "img", main=desc is not None and is_main_process(),
                   logger=log)
    for batch in bar.wrap(build_loader(stream, batch_size, workers, device.type == "cuda"),
                          units=lambda b: len(b["label"])):
        out = model(norm(batch_images(batch, stream.spec, channels=len(norm.mean), device=device)))
        logits.append((out[0] if isinstance(out, tuple) else out).float().cpu())
        labels.append(batch["label"])
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def inference_device(name: str, key: str) -> torch.device:
    """The device for an inference pass set by ``key`` (auto | cpu | cuda)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda, but torch sees no CUDA device on this machine; set {key} "
                         "to auto (the GPU when there is one) or cpu.")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def topk_hits(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[int, np.ndarray]:
    """For each k: bool ``[n]``, whether the label is among the k largest logits (k capped at C)."""
    ranked = np.argsort(-logits, axis=1)[:, :max(ks)]
    return {k: (ranked[:, :k] == labels[:, None]).any(1) for k in ks}


def evaluate(accelerator: Any, model: torch.nn.Module, stream: ShardStream, batch_size: int,
             norm: augment.Normalization, workers: int = 0) -> dict:
    logits, labels = predict(accelerator.unwrap_model(model), stream, device=accelerator.device,
                             batch_size=batch_size, norm=norm, workers=workers)
    hits = topk_hits(logits, labels, (1, 5))
    local = torch.tensor([hits[1].sum(), hits[5].sum(), len(labels)], dtype=torch.float64,
                         device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")
    return {"test_top1": float(total[0] / total[2]), "test_top5": float(total[1] / total[2])}


def fit(job: TrainJob) -> tuple[DistillStudent, list[dict[str, Any]]]:
    sched = job.sched
    accelerator = make_accelerator(cpu=not torch.cuda.is_available(),
                                   mixed_precision=sched.mixed_precision,
                                   gradient_accumulation_steps=sched.grad_accum)
    check_same_inputs(job.inputs, world=accelerator.num_processes)
    groups = build_param_groups(job.model, lr=sched.lr, weight_decay=sched.weight_decay,
                                head_lr_scale=job.loss.head_lr_scale,
                                no_decay_norm_bias=sched.no_decay_norm_bias)
    optimizer = torch.optim.SGD(groups, lr=sched.lr, momentum=sched.momentum)
    start = 1
    if job.resume:
        assert job.ckpt_dir is not None
        state = resume_from_main(job.ckpt_dir, model=job.model, optimizer=optimizer, fingerprint=job.fingerprint,
                                 main=accelerator.is_main_process, world=accelerator.num_processes)
        start, job.history = state["epoch"] + 1, state["history"]
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        job.model.to(memory_format=torch.channels_last)
        if job.teacher is not None:
            job.teacher.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(job.model, optimizer)
    if job.teacher is not None:
        job.teacher.to(accelerator.device).eval()  # the one place the teacher is put in eval mode
        job.teacher.requires_grad_(False)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_stream = ShardStream(job.train, rank=rank, world=world)
    test_stream = ShardStream(job.test, rank=rank, world=world)
    main = accelerator.is_main_process
    if main:
        log.info("%s: optimising %s", job.desc, describe_loss(job.loss, 1.0))
    job.live = LiveLog(job.live_dir, main=main, history=job.history)
    clock = RunClock(start, sched.epochs)
    for epoch in range(start, sched.epochs + 1):
        row = train_epoch(job, accelerator, model, optimizer, train_stream, epoch, clock)
        check_finite_weights(accelerator.unwrap_model(model), job.desc, epoch, sched.SECTION or "train")
        row.update(evaluate(accelerator, model, test_stream, max(256, sched.batch_size), job.norm, sched.workers))
        job.history.append(row)
        job.live.epoch(row)
        if main:  # every value in the row is over all ranks' samples
            log.info("%s epoch %d/%d: loss %.4f top1 %.4f (%.0f img/s), run ETA %s", job.desc, epoch,
                     sched.epochs, row["loss/total"], row["test_top1"], row["img_per_s"],
                     format_eta(clock.remaining(epoch, 1.0)))
        if job.ckpt_dir and job.checkpoint_every and epoch % job.checkpoint_every == 0:
            if accelerator.is_main_process:
                # A fresh run replaces an older run's checkpoints only once it has one of its own
                # (written in full), so a run that fails early leaves the previous checkpoints usable.
                save_checkpoint(job.ckpt_dir, epoch=epoch, model=accelerator.unwrap_model(model),
                                optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                state={"fingerprint": job.fingerprint, "history": job.history},
                                replace_others=not job.resume and epoch == job.checkpoint_every)
            accelerator.wait_for_everyone()
    job.live.close()
    return accelerator.unwrap_model(model), job.history


def is_main_process() -> bool:
    """Rank 0 of the launched world (before or after Accelerate is set up)."""
    return int(os.environ.get("RANK", "0")) == 0
