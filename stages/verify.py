"""`aekt verify-cache`: recompute the teacher on stored views and compare with the cached logits."""

import json
from pathlib import Path

import click

from stages.common import (
    MANIFEST_OPTION,
    PARAMS_OPTION,
    SHARDS_OPTION,
    STORE_OPTION,
    TEACHER_OPTION,
    read_sections,
    stage,
)


def _not_nan(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and value != value:
        raise click.BadParameter("nan is not a number; pass a tolerance >= 0.")
    return value


@click.command("verify-cache")
@PARAMS_OPTION
@STORE_OPTION
@MANIFEST_OPTION
@SHARDS_OPTION
@TEACHER_OPTION
@click.option("--samples", default=64, show_default=True, type=click.IntRange(min=1),
              help="(view, sample) pairs to recompute.")
@click.option("--seed", default=0, show_default=True, help="Seed that picks the (view, sample) pairs.")
@click.option("--tolerance", type=click.FloatRange(min=0.0), default=None, callback=_not_nan,
              help="Max KL at tau=1 accepted (default: the codec's stated bound).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@stage
def main(params_path: str, store_path: str, manifest_path: str, shards_dir: str, teacher_path: str,
         samples: int, seed: int, tolerance: float | None, as_json: bool) -> None:
    """Replay stored augmentation params through a fresh teacher; exit 1 past the tolerance, saying
    which check failed, by how much and where. Also prints bytes per sample-view on disk and the KL of
    decoded vs fresh logits at tau 1 and 4."""
    from pipeline.cache.store import CacheError
    from pipeline.cache.verify import failure_message, verify_cache
    from pipeline.data.location import as_location
    from pipeline.outputs import echo

    cache, augment = read_sections(params_path, "cache", "augment")
    report = verify_cache(store_path=as_location(store_path), manifest_path=Path(manifest_path),
                          shards_dir=as_location(shards_dir), teacher_path=Path(teacher_path), cfg=cache,
                          aug=augment, samples=samples, seed=seed, tolerance=tolerance)
    if as_json:
        echo(json.dumps(report, indent=2), rerun="aekt verify-cache")
    else:
        echo(
            f"{report['store']} [{report['codec']}]: {report['checked']} views checked, "
            f"max |dlogit| {report['max_abs_logit_error']:.3g}, KL tau=1 max {report['kl_tau1_max']:.3g}, "
            f"tau=4 max {report['kl_tau4_max']:.3g}, params replayable: {report['params_replayable']}, "
            f"{report['disk_bytes_per_sample_view']:.1f} B/sample-view on disk "
            f"({report['raw_bytes_per_sample_view']} raw); {report['rows_done']} of "
            f"{report['rows_total']} (view, shard) rows finished"
            + ("" if report["rows_done"] == report["rows_total"] else
               " (unfinished rows are not verified: rerun `aekt cache`)"), rerun="aekt verify-cache")
    if not report["ok"]:
        raise CacheError(failure_message(report))
