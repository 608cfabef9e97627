"""The `aekt` command: one subcommand per DVC stage, plus tools that read the cache."""

import os

import click

from stages import bench, cache, evaluate, inspect, plots, prepare, preset, student, teacher, verify
from stages.common import DEBUG_ENV


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="aekt-pipeline", prog_name="aekt")
@click.option("--debug", is_flag=True, help=f"Show the full traceback of every failure (same as {DEBUG_ENV}=1).")
def main(debug: bool) -> None:
    """Teacher-logit caching knowledge distillation (AEKT). Stages, in order:
    prepare -> teacher -> cache -> student -> evaluate (`dvc repro` runs them all)."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # DataLoader workers and torchrun children inherit it


for command in (prepare.main, teacher.main, cache.main, student.main, evaluate.main, verify.main,
                inspect.main, plots.main, bench.main, preset.main):
    main.add_command(command)

if __name__ == "__main__":
    main()
