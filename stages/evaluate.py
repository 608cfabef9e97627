"""`aekt evaluate`: top-1/top-5 and per-class accuracy of the exported student on the test split."""

from pathlib import Path

import click

from stages.common import MANIFEST_OPTION, PARAMS_OPTION, SHARDS_OPTION, layout_default, read_sections, stage


@click.command("evaluate")
@PARAMS_OPTION
@click.option("--model", "model_path", type=click.Path(dir_okay=False),
              **layout_default("models/{dataset}/student.safetensors"),
              help="Student weights written by `aekt student` (card beside them).")
@MANIFEST_OPTION
@SHARDS_OPTION
@click.option("--metrics", default="metrics/eval.json", show_default=True, type=click.Path(dir_okay=False),
              help="Metrics JSON to write (top-1/top-5, teacher top-1 and agreement; a row of `dvc exp show`).")
@click.option("--plots", "plots_dir", default="plots/eval", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write per_class.csv, per_class.json and confusion.png into.")
@click.option("--teacher", "teacher_path", default=None, type=click.Path(dir_okay=False),
              help="Also score this teacher on the same test samples and report the student's top-1 "
                   "agreement with it (teacher_agreement); by default the teacher is not scored.")
@stage
def main(params_path: str, model_path: str, manifest_path: str, shards_dir: str, metrics: str,
         plots_dir: str, teacher_path: str | None) -> None:
    """Write metrics/eval.json, a per-class CSV and a confusion-matrix PNG."""
    from pipeline.artifacts import check_writable
    from pipeline.data.location import as_location
    from pipeline.evaluate import run_evaluate

    check_writable(**{"--metrics": metrics}, folders={"--plots": plots_dir})
    cfg, augment = read_sections(params_path, "eval", "augment")
    report = run_evaluate(model_path=Path(model_path), manifest_path=Path(manifest_path),
                          shards_dir=as_location(shards_dir), metrics_path=Path(metrics),
                          plots_dir=Path(plots_dir), cfg=cfg, aug=augment,
                          teacher_path=Path(teacher_path) if teacher_path else None)
    agreement = f", agrees with the teacher on {report['teacher_agreement']:.2%}" if teacher_path else ""
    click.echo(f"{report['arch']}: test top-1 {report['top1']:.4f} on {report['num_samples']} samples{agreement}")
