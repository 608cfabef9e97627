"""`aekt student`: stage 2, train the student from shards + cached logits with the chosen loss."""

from pathlib import Path

import click

from stages.common import (
    MANIFEST_OPTION,
    NO_PROGRESS_OPTION,
    PARAMS_OPTION,
    SHARDS_OPTION,
    STORE_OPTION,
    TEACHER_OPTION,
    echo_once,
    layout_default,
    live_option,
    read_sections,
    stage,
)


@click.command("student")
@PARAMS_OPTION
@MANIFEST_OPTION
@SHARDS_OPTION
@TEACHER_OPTION
@STORE_OPTION
@click.option("--out", "model_out", type=click.Path(dir_okay=False),
              **layout_default("models/{dataset}/student.safetensors"),
              help="Student weights (safetensors) to write, without the distillation head; its card goes "
                   "beside them as .json, the head as student-head.safetensors.")
@click.option("--metrics", default="metrics/student.json", show_default=True, type=click.Path(dir_okay=False),
              help="Metrics JSON to write (final/best top-1, top-5, loss, seconds; a row of `dvc exp show`).")
@click.option("--history", default="plots/train.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Per-epoch CSV to write (loss terms, gradient norms, w statistics, test top-1, speed; "
                   "for `dvc plots show`).")
@click.option("--checkpoints", type=click.Path(file_okay=False), **layout_default("runs/{dataset}/student"),
              help="Folder of resumable checkpoints (written every train.checkpoint_every epochs).")
@click.option("--resume", is_flag=True, help="Continue from the newest intact checkpoint.")
@live_option("student")
@NO_PROGRESS_OPTION
@stage
def main(params_path: str, manifest_path: str, shards_dir: str, teacher_path: str, store_path: str,
         model_out: str, metrics: str, history: str, checkpoints: str, resume: bool,
         live_dir: str | None, no_progress: bool) -> None:
    """Train `student.arch` with `loss.name` (CE + AEKT by default), reading each shard's cached
    logits once per epoch; exports the student without its distillation head."""
    from pipeline.artifacts import check_writable
    from pipeline.data.location import as_location
    from pipeline.student import StudentPaths, train_student

    check_writable(**{"--out": model_out, "--metrics": metrics, "--history": history},
                   folders={"--checkpoints": checkpoints})
    student, loss, train, cache, augment = read_sections(
        params_path, "student", "loss", "train", "cache", "augment")
    paths = StudentPaths(manifest=Path(manifest_path), shards_dir=as_location(shards_dir),
                         teacher=Path(teacher_path), store=as_location(store_path), model_out=Path(model_out),
                         metrics=Path(metrics), history=Path(history), ckpt_dir=Path(checkpoints),
                         live=Path(live_dir) if live_dir else None)
    result = train_student(paths, student=student, loss=loss, train=train, cache=cache, aug=augment,
                           resume=resume, progress=not no_progress)
    echo_once(f"student {student.arch} [{loss.name}]: final top-1 {result['final_top1']:.4f}, best "
              f"{result['best_top1']:.4f} (epoch {result['best_epoch']}) -> {model_out}")
