"""`aekt bench NAME [OPTIONS]`: run one benchmark (or all) from bench/; options after NAME go to it."""

import importlib
import logging
import sys

import click

# Listed here rather than imported from bench/ so that `aekt` (every subcommand) starts without
# importing the benchmarks; bench/__init__.py holds the same tuple and a test keeps them equal.
BENCHMARKS = ("student_step", "stage1", "cache_read", "scaling", "object_store", "loader", "precision", "decode")


@click.command("bench", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", metavar="NAME", type=click.Choice([*BENCHMARKS, "all"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(name: str, args: tuple[str, ...]) -> None:
    """Measure speed ratios side by side; print a table and write bench/results/NAME-DEVICE.json.

    NAME is student_step, stage1, cache_read, scaling, object_store, loader, precision, decode, or all
    (bench/run_all.py). ARGS, everything after NAME, go to the benchmark:
    `aekt bench student_step --device cuda --batch 256`, `aekt bench all --device cuda`,
    `aekt bench stage1 --help`. See docs/benchmarks.md."""
    # Library INFO lines (one per prepared dataset) would bury the tables.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    module = importlib.import_module(f"bench.{'run_all' if name == 'all' else name}")
    code = module.main(list(args))
    if code:
        raise SystemExit(code)
