"""`aekt teacher`: train the teacher (CE) or import `teacher.checkpoint`."""

from pathlib import Path

import click

from stages.common import (
    MANIFEST_OPTION,
    NO_PROGRESS_OPTION,
    PARAMS_OPTION,
    SHARDS_OPTION,
    echo_once,
    layout_default,
    live_option,
    read_sections,
    stage,
)


@click.command("teacher")
@PARAMS_OPTION
@MANIFEST_OPTION
@SHARDS_OPTION
@click.option("--out", "model_out", type=click.Path(dir_okay=False),
              **layout_default("models/{dataset}/teacher.safetensors"),
              help="Teacher weights (safetensors) to write; its card (arch, classes, sha256) goes beside "
                   "them as .json.")
@click.option("--metrics", default="metrics/teacher.json", show_default=True, type=click.Path(dir_okay=False),
              help="Metrics JSON to write (test top-1, epochs, seconds; a row of `dvc exp show`).")
@click.option("--history", default="plots/teacher.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Per-epoch CSV to write (loss, test top-1, speed; for `dvc plots show`).")
@live_option("teacher")
@NO_PROGRESS_OPTION
@stage
def main(params_path: str, manifest_path: str, shards_dir: str, model_out: str, metrics: str,
         history: str, live_dir: str | None, no_progress: bool) -> None:
    """Train `teacher.arch` with CE on the shards (or import a checkpoint) and record its sha256."""
    from pipeline.artifacts import check_writable
    from pipeline.data.location import as_location
    from pipeline.teacher import run_teacher

    check_writable(**{"--out": model_out, "--metrics": metrics, "--history": history})
    teacher, augment = read_sections(params_path, "teacher", "augment")
    result = run_teacher(manifest_path=Path(manifest_path), shards_dir=as_location(shards_dir),
                         model_out=Path(model_out), metrics_path=Path(metrics),
                         history_path=Path(history), cfg=teacher, aug=augment, progress=not no_progress,
                         live_dir=Path(live_dir) if live_dir else None)
    echo_once(f"teacher {result['arch']} ({result['source']}): test top-1 {result['test_top1']:.4f} "
              f"-> {model_out}")
