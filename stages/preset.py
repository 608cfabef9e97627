"""`aekt preset-args FILE`: a preset as `dvc exp run -S` arguments, so a preset runs as an experiment
without copying it over params.yaml:

    dvc exp run --temp $(aekt preset-args presets/cifar10-cpu.yaml)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stages.common import stage


def set_param_args(params: dict[str, dict[str, Any]]) -> list[str]:
    """`-S section.key=value` pairs for every key of every section; values as compact YAML flow
    scalars/lists (no spaces, so the shell's word splitting keeps each pair whole)."""
    args = []
    for name, values in params.items():
        for key, value in (values or {}).items():
            text = json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value
            if isinstance(value, str) and (not value or any(c in value for c in " \t,:[]{}'\"#")):
                raise click.ClickException(f"{name}.{key}: the value {value!r} has characters that do not "
                                           "survive `dvc exp run -S` on a shell command line; copy the preset "
                                           "over params.yaml instead (`cp PRESET params.yaml`).")
            args += ["-S", f"{name}.{key}={text}"]
    return args


@click.command("preset-args")
@click.argument("preset", type=click.Path(exists=True, dir_okay=False))
@stage
def main(preset: str) -> None:
    """Print PRESET (a complete params file, e.g. presets/cifar10.yaml) as `-S key=value` arguments
    for `dvc exp run`, after checking that it is a valid params file."""
    from pipeline.config import SECTIONS, load_params, section

    params = load_params(preset)
    root = (params.get("data") or {}).get("root")
    if isinstance(root, str) and not Path(root).is_absolute():
        # An experiment runs in a temporary copy of the workspace, where a relative root would
        # point elsewhere: pin it to where it is from here (the repository root).
        params["data"]["root"] = str(Path(root).resolve())
    for name in SECTIONS:
        section(params, name)  # validate before anything runs
    click.echo(" ".join(set_param_args(params)))
