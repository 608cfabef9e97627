"""Student train-step throughput: CE-only vs cached-logit KD vs online KD, side by side in one run.

All three modes call the trainer's real ``pipeline.train.train_step`` with the same student
architecture (same initial weights), batch size and pool of batches; they differ only in where the
teacher logits come from: nowhere (CE), a tensor in the batch (cached, as the Zarr stream delivers
them), or a teacher forward inside the step (online). The teacher's inference-only forward rate is
measured beside them (the ceiling stage 1 can reach). Pixels are random uint8: speed does not
depend on image content. Usage::

    python -m bench.student_step                       # CPU: digits + resnet32x4->resnet8x4, tiny
    python -m bench.student_step --device cuda         # GPU: batches 64/256/1024, data on GPU and host
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench.common import (
    base_parser,
    csv_ints,
    csv_strs,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    memory_format,
    paired_ratio,
    prepare_run,
    profile_top,
    summary,
)
from pipeline import augment
from pipeline.config import LossConfig, ScheduleConfig
from pipeline.distributed import make_accelerator
from pipeline.heads import build_param_groups
from pipeline.losses import LOSSES
from pipeline.models import build_model
from pipeline.stream import StreamSpec
from pipeline.student import build_student
from pipeline.train import TrainJob, train_step

NAME = "student_step"
MODES = ("teacher_forward", "ce", "cached_kd", "online_kd")
TARGETS = {"cached_over_ce": 0.9, "cached_over_online": 1.5,
           "applies_to": "resnet32x4 -> resnet8x4 on a GPU (issue 9)"}


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str
    student: str
    num_classes: int
    channels: int
    size: int
    recipe: str


PAIRS: dict[str, Pair] = {
    "digits": Pair("digits", "digits_cnn", "digits_mlp", 10, 1, 8, "digits"),
    "cifar": Pair("cifar", "resnet32x4", "resnet8x4", 100, 3, 32, "cifar"),
    "imagenet": Pair("imagenet", "resnet34", "resnet18", 1000, 3, 224, "imagenet"),
}

# (batches, steps per round, warm-up steps) by (pair, device type). CPU sizes keep a run to ~1 min
# on 2 cores (a resnet8x4 step at batch 64 takes seconds there); GPU sizes match DESIGN's table.
DEFAULTS: dict[tuple[str, str], tuple[list[int], int, int]] = {
    ("digits", "cpu"): ([64], 50, 5), ("digits", "cuda"): ([256], 200, 20),
    ("cifar", "cpu"): ([64], 2, 2), ("cifar", "cuda"): ([64, 256, 1024], 100, 10),
    ("imagenet", "cpu"): ([8], 1, 1), ("imagenet", "cuda"): ([256], 30, 5),
}


def bench_accelerator(device: torch.device, precision: str) -> Any:
    # Accelerate keeps one process-wide state: every benchmark in a process uses these settings.
    return make_accelerator(cpu=device.type == "cpu", mixed_precision=precision)


class StepRig:
    """One pair at one batch size: a teacher, one student per mode, a pool of ready batches."""

    def __init__(self, pair: Pair, *, batch: int, accelerator: Any, data_on: str = "device",
                 pool: int = 4, seed: int = 0, modes: Sequence[str] = MODES, loss: str = "aekt",
                 compile_loss: bool = False):
        self.pair, self.batch, self.acc = pair, batch, accelerator
        device, fmt = accelerator.device, memory_format(accelerator.device)
        torch.manual_seed(seed)
        self.teacher = build_model(pair.teacher, num_classes=pair.num_classes, in_channels=pair.channels)
        self.teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
        self.batches = [self._make_batch(data_on, fmt) for _ in range(pool)]
        self.cursor = 0
        self.students: dict[str, tuple[TrainJob, torch.nn.Module, Any]] = {}
        spec = StreamSpec(manifest_path=Path("-"), shards_dir=Path("-"), split="train", recipe=pair.recipe,
                          image_size=pair.size, aug_seed=0, views=1)
        shape = SimpleNamespace(num_classes=pair.num_classes, channels=pair.channels)
        for mode in modes:
            if mode == "teacher_forward":
                continue
            # warmup_epochs=0: the distillation terms are computed at full weight from step one.
            loss_cfg = LossConfig(name="ce") if mode == "ce" else LossConfig(name=loss, warmup_epochs=0)
            # build_student applies the trainer's rule (KD losses get the serial head, CE none).
            model = build_student(pair.student, shape, loss_cfg, seed).to(device, memory_format=fmt)  # type: ignore[arg-type]
            groups = build_param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_scale=loss_cfg.head_lr_scale,
                                        no_decay_norm_bias=False)
            wrapped, opt = accelerator.prepare(model, torch.optim.SGD(groups, lr=0.01, momentum=0.9))
            job = TrainJob(model=model, sched=ScheduleConfig(batch_size=batch), loss=loss_cfg, train=spec,
                           test=spec, teacher=self.teacher if mode == "online_kd" else None, progress=False,
                           compile_loss=compile_loss)
            self.students[mode] = (job, wrapped, opt)

    def _make_batch(self, data_on: str, fmt: torch.memory_format) -> dict[str, torch.Tensor]:
        p, device = self.pair, self.acc.device
        images = torch.randint(0, 256, (self.batch, p.channels, p.size, p.size), dtype=torch.uint8,
                               device=device).contiguous(memory_format=fmt)
        labels = torch.randint(0, p.num_classes, (self.batch,), device=device)
        # What the cache holds: the teacher's float32 logits of exactly these pixels (no_grad, not
        # inference_mode: inference tensors cannot be saved for the student's backward).
        with torch.no_grad():
            logits = self.teacher(augment.normalize(images, p.recipe)).float()
        # Pixels arrive augmented (DESIGN's "data already on the GPU"); an empty "params" tells a
        # trainer with on-device batch augmentation that none is pending.
        batch = {"image": images, "label": labels, "teacher": logits,
                 "params": torch.zeros(self.batch, 0, device=device)}
        if data_on == "host":  # as a DataLoader with pin_memory delivers it: train_step copies async
            batch = {k: v.cpu().pin_memory() if device.type == "cuda" else v.cpu() for k, v in batch.items()}
        return batch

    def run(self, mode: str, steps: int) -> int:
        """``steps`` steps of ``mode``; returns the images processed."""
        device, recipe = self.acc.device, self.pair.recipe
        for _ in range(steps):
            batch = self.batches[self.cursor % len(self.batches)]
            self.cursor += 1
            if mode == "teacher_forward":
                with torch.inference_mode(), self.acc.autocast():
                    self.teacher(augment.normalize(batch["image"].to(device, non_blocking=True), recipe))
            else:
                job, model, opt = self.students[mode]
                train_step(job, self.acc, model, opt, batch, 1.0)
        return steps * self.batch


def measure(pair: Pair, *, batch: int, accelerator: Any, steps: int, warmup: int, rounds: int,
            data_on: str = "device", modes: Sequence[str] = MODES, profile: bool = False, loss: str = "aekt",
            compile_loss: bool = False) -> dict[str, Any]:
    """img/s of each mode (median over interleaved rounds) and the paired ratios."""
    rig = StepRig(pair, batch=batch, accelerator=accelerator, data_on=data_on, modes=modes, loss=loss,
                  compile_loss=compile_loss)
    for mode in modes:  # warm-up (allocator, cuDNN autotune, lazy inits) is not timed
        rig.run(mode, warmup)
    rates = interleaved({m: functools.partial(rig.run, m, steps) for m in modes}, rounds=rounds,
                        device=accelerator.device)
    entry: dict[str, Any] = {
        "pair": pair.name, "teacher": pair.teacher, "student": pair.student, "num_classes": pair.num_classes,
        "image_shape": [pair.channels, pair.size, pair.size], "batch": batch, "data_on": data_on,
        "steps_per_round": steps, "warmup_steps": warmup,
        "img_per_s": {m: summary(r)["median"] for m, r in rates.items()},
        "img_per_s_rounds": rates, "ratios": {}, "ratio_spread": {}}
    for key, num, den in (("cached_over_ce", "cached_kd", "ce"),
                          ("cached_over_online", "cached_kd", "online_kd"),
                          ("online_over_ce", "online_kd", "ce")):
        if num in rates and den in rates:
            r = paired_ratio(rates[num], rates[den])
            entry["ratios"][key], entry["ratio_spread"][key] = r["median"], [r["min"], r["max"]]
    if profile and "cached_kd" in modes:
        entry["profile_cached_kd"] = profile_top(lambda: rig.run("cached_kd", max(steps, 1)))
    return entry


def run(*, device: str = "cpu", pairs: Sequence[str] = ("digits", "cifar"),
        batches: Sequence[int] | None = None, steps: int | None = None, warmup: int | None = None,
        rounds: int = 3,
        data_on: Sequence[str] | None = None, precision: str | None = None, threads: int | None = None,
        profile: bool = False, loss: str = "aekt", compile_loss: bool = False) -> dict[str, Any]:
    dev, precision = prepare_run(device, threads, precision)
    accelerator = bench_accelerator(dev, precision)
    data_on = list(data_on or (["device", "host"] if dev.type == "cuda" else ["device"]))
    results = []
    for name in pairs:
        d_batches, d_steps, d_warmup = DEFAULTS[(name, dev.type)]
        for batch in batches or d_batches:
            for where in data_on:
                results.append(measure(PAIRS[name], batch=batch, accelerator=accelerator,
                                       steps=d_steps if steps is None else steps,
                                       warmup=d_warmup if warmup is None else warmup, rounds=rounds,
                                       data_on=where, profile=profile, loss=loss, compile_loss=compile_loss))
    return {"benchmark": NAME, "machine": machine_info(dev),
            "config": {"precision": precision, "rounds": rounds, "memory_format": str(memory_format(dev)),
                       "optimizer": "SGD momentum 0.9 (trainer's param groups)",
                       "loss_cached_online": f"{loss} (serial head)", "loss_ce": "ce (no head)",
                       "compile_loss": compile_loss,
                       "data": "random uint8 pixels, a pool of 4 batches; cached logits = teacher's fp32 "
                               "logits of the same pixels"},
            "targets": TARGETS, "results": results}


def table(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["results"]:
        ips, ratios = r["img_per_s"], r["ratios"]
        rows.append([f"{r['teacher']}->{r['student']}", r["batch"], r["data_on"],
                     *(ips.get(m, "-") for m in MODES),
                     ratios.get("cached_over_ce", "-"), ratios.get("cached_over_online", "-")])
    head = ["pair", "batch", "data", "teacher fwd", "CE", "cached KD", "online KD", "cached/CE",
            "cached/online"]
    return (f"student_step on {payload['machine']['device_name']} (img/s, median of "
            f"{payload['config']['rounds']} interleaved rounds; targets on a GPU: cached/CE >= 0.9, "
            f"cached/online >= 1.5)\n" + format_table(head, rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--pairs", type=csv_strs, default=["digits", "cifar"], help=f"of {', '.join(PAIRS)}")
    parser.add_argument("--batch", type=csv_ints, default=None, help="batch sizes, e.g. 64,256,1024")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode per round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per mode")
    parser.add_argument("--data-on", type=csv_strs, default=None, help="device,host (default: both on cuda)")
    parser.add_argument("--loss", default="aekt", choices=[n for n in LOSSES if n != "ce"],
                        help="the cached and online modes' loss")
    parser.add_argument("--compile-loss", action="store_true", help="train.compile_loss: torch.compile the loss")
    args = parser.parse_args(argv)
    payload = run(device=args.device, pairs=args.pairs, batches=args.batch, steps=args.steps,
                  warmup=args.warmup, rounds=args.rounds, data_on=args.data_on, precision=args.precision,
                  threads=args.threads, profile=args.profile, loss=args.loss, compile_loss=args.compile_loss)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
