"""The `aekt` command: one subcommand per DVC stage, plus tools that read the cache."""

import click

from stages import bench, cache, evaluate, inspect, prepare, student, teacher, verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Teacher-logit caching knowledge distillation (AEKT). Stages, in order:
    prepare -> teacher -> cache -> student -> evaluate (`dvc repro` runs them all)."""


for command in (prepare.main, teacher.main, cache.main, student.main, evaluate.main, verify.main,
                inspect.main, bench.main):
    main.add_command(command)

if __name__ == "__main__":
    main()
