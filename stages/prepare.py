"""`aekt prepare`: turn the dataset named in params.yaml `data:` into WebDataset shards + a manifest."""

from pathlib import Path

import click

from stages.common import PARAMS_OPTION, layout_default, read_sections, stage


@click.command("prepare")
@PARAMS_OPTION
@click.option("--shards-dir", type=click.Path(file_okay=False), **layout_default("data/shards/{data_name}"),
              help="Folder the {split}-{i:05d}.tar WebDataset shards are written to (stale shards in it are "
                   "removed).")
@click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False),
              **layout_default("manifests/{data_name}.json"),
              help="Manifest JSON to write (shard names, sample counts, sha256, classes; committed to git).")
@stage
def main(params_path: str, shards_dir: str, manifest_path: str) -> None:
    """Write the train/test shards and the manifest (counts, sha256, classes) for `data.source`."""
    from pipeline.data import prepare
    from pipeline.data.location import as_location, is_url

    if is_url(manifest_path):
        raise click.BadParameter(f"{manifest_path}: the manifest is a local file committed to git (the shards "
                                 "may live at a URL); pass a local path.", param_hint="--manifest")
    (data,) = read_sections(params_path, "data")
    manifest = prepare(data, shards_dir=as_location(shards_dir), manifest_path=Path(manifest_path))
    for name, split in manifest.splits.items():
        click.echo(f"{name}: {split.num_samples} samples in {len(split.shards)} shards")
    click.echo(f"wrote {manifest_path} (sha256 {manifest.sha256[:12]}…)")
