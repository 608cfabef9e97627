"""`aekt inspect`: what the cached teacher will teach, read straight from the Zarr store (no teacher)."""

import json
from pathlib import Path

import click

from stages.common import MANIFEST_OPTION, SHARDS_OPTION, stage


@click.command("inspect")
@click.argument("store_path", metavar="STORE", type=click.Path())
@MANIFEST_OPTION
@SHARDS_OPTION
@click.option("--tau", default=1.0, show_default=True, help="Temperature for p_t, calibration and entropy.")
@click.option("--class", "classes", multiple=True, metavar="NAME_OR_INDEX",
              help="Only samples of this class (repeatable; a name wins over an index).")
@click.option("--view", "views", multiple=True, type=int, help="Only this cached view (repeatable).")
@click.option("--max-shards", type=click.IntRange(min=1), default=None,
              help="Read only this many evenly spaced shards (a quick look at a large store). "
                   "[default: every shard]")
@click.option("--student", "student_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Student weights; its serial head (student-head.safetensors beside it, refused unless "
                   "it records this file's sha256) is shown. [default: none, no student section]")
@click.option("--eval-metrics", "eval_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="plots/eval/per_class.json (written by `aekt evaluate`): the student's per-class top-1 next "
                   "to the teacher's p_t. [default: none]")
@click.option("--plots", "plots_dir", default="plots/inspect", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the PNGs and per_class_confidence.csv.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False),
              help="Also write the JSON report to this file (atomically: a failed run leaves no partial file). "
                   "[default: none, not written]")
@stage
def main(store_path: str, manifest_path: str, shards_dir: str, tau: float, classes: tuple[str, ...],
         views: tuple[int, ...], max_shards: int | None, student_path: str | None, eval_path: str | None,
         plots_dir: str, as_json: bool, json_out: str | None) -> None:
    """Teacher confidence report of the finished rows of STORE: per-class p_t, accuracy, ECE,
    non-target entropy, confused pairs and agreement across views, plus PNG plots and a CSV."""
    from pipeline.data.location import as_location
    from pipeline.inspect_cache import inspect_store
    from pipeline.inspect_text import format_text
    from pipeline.outputs import echo, write_text

    if eval_path and not student_path:
        raise click.UsageError("--eval-metrics needs --student (the student it was measured on).")
    report = inspect_store(store_path=as_location(store_path), manifest_path=Path(manifest_path),
                           shards_dir=as_location(shards_dir), tau=tau, classes=classes, views=views,
                           max_shards=max_shards, student_path=student_path and Path(student_path),
                           eval_path=eval_path and Path(eval_path), plots_dir=Path(plots_dir))
    if json_out:
        write_text(Path(json_out), json.dumps(report, indent=2, sort_keys=True) + "\n", rerun="aekt inspect")
    echo(json.dumps(report, indent=2) if as_json else format_text(report), rerun="aekt inspect")
