"""`aekt cache`: stage 1, run the teacher once over V augmented views into the Zarr logit store."""

import json
from pathlib import Path

import click

from stages.common import PARAMS_OPTION, read_sections, stage


@click.command("cache")
@PARAMS_OPTION
@click.option("--manifest", "manifest_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--shards-dir", default="data/shards", show_default=True, type=click.Path(file_okay=False))
@click.option("--teacher", "teacher_path", default="models/teacher.safetensors", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--store", "store_path", required=True, type=click.Path(file_okay=False),
              help="Zarr store to write or resume, e.g. cache/digits-digits_cnn.zarr.")
@click.option("--rebuild", is_flag=True,
              help="Rebuild the store if it was built from other inputs (default: refuse).")
@click.option("--summary", default=None, type=click.Path(dir_okay=False),
              help="Write a JSON summary (items, seconds, bytes) here.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@stage
def main(params_path: str, manifest_path: str, shards_dir: str, teacher_path: str, store_path: str,
         rebuild: bool, summary: str | None, no_progress: bool) -> None:
    """Cache teacher logits for every (view, shard); resumes, and splits work across processes
    (`torchrun --nproc_per_node N -m stages.cli cache ...` on CPU, `accelerate launch` on GPUs)."""
    from pipeline.cache.build import build_cache

    cache, augment = read_sections(params_path, "cache", "augment")
    result = build_cache(manifest_path=Path(manifest_path), shards_dir=Path(shards_dir),
                         teacher_path=Path(teacher_path), store_path=Path(store_path), cfg=cache,
                         aug=augment, rebuild=rebuild, progress=not no_progress)
    if result["disk_bytes"]:
        if summary:
            Path(summary).parent.mkdir(parents=True, exist_ok=True)
            Path(summary).write_text(json.dumps(result, indent=2) + "\n")
        click.echo(f"cache {store_path}: {result['items_pending']} of {result['items_total']} (view, shard) "
                   f"items written in {result['seconds']:.1f}s; "
                   f"{sum(result['disk_bytes'].values()) / 1e6:.2f} MB on disk")
