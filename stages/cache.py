"""`aekt cache`: stage 1, run the teacher once over V augmented views into the Zarr logit store."""

import json
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
    read_sections,
    stage,
)


@click.command("cache")
@PARAMS_OPTION
@MANIFEST_OPTION
@SHARDS_OPTION
@TEACHER_OPTION
@STORE_OPTION
@click.option("--rebuild", is_flag=True,
              help="Rebuild the store if it was built from other inputs (default: refuse).")
@click.option("--summary", default=None, type=click.Path(dir_okay=False),
              help="JSON summary to write (work items, seconds, bytes on disk); by default none is written.")
@NO_PROGRESS_OPTION
@stage
def main(params_path: str, manifest_path: str, shards_dir: str, teacher_path: str, store_path: str,
         rebuild: bool, summary: str | None, no_progress: bool) -> None:
    """Cache teacher logits for every (view, shard); resumes, and splits work across processes
    (`accelerate launch --multi_gpu --num_processes N -m stages.cli cache ...` or `torchrun
    --nproc_per_node N -m stages.cli cache ...`, on CPU as on GPUs)."""
    from pipeline.cache.build import build_cache
    from pipeline.data.location import as_location
    from pipeline.outputs import write_text

    cache, augment = read_sections(params_path, "cache", "augment")
    result = build_cache(manifest_path=Path(manifest_path), shards_dir=as_location(shards_dir),
                         teacher_path=Path(teacher_path), store_path=as_location(store_path), cfg=cache,
                         aug=augment, rebuild=rebuild, progress=not no_progress)
    if result["disk_bytes"]:
        if summary:
            write_text(Path(summary), json.dumps(result, indent=2) + "\n", rerun="aekt cache")
        echo_once(f"cache {store_path}: {result['items_pending']} of {result['items_total']} (view, shard) "
                  f"items written in {result['seconds']:.1f}s; "
                  f"{sum(result['disk_bytes'].values()) / 1e6:.2f} MB on disk")
