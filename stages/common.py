"""Shared CLI plumbing: params loading, logging set-up, and user errors as one clear paragraph."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import ConfigError, load_params, section

PARAMS_OPTION = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="params.yaml to read sections from.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input: shown as a message, not a traceback."""
    from pipeline.artifacts import ArtifactError
    from pipeline.cache.store import CacheError
    from pipeline.data import DataError
    from pipeline.distributed import LaunchError
    from pipeline.models import CheckpointError
    from pipeline.run_state import ResumeError
    from pipeline.train import TrainingDiverged

    return (ConfigError, DataError, CacheError, ArtifactError, CheckpointError, ResumeError,
            LaunchError, TrainingDiverged, FileNotFoundError)


def stage(func: Callable[..., Any]) -> Callable[..., Any]:
    """Configure logging and turn user errors into a non-zero exit with the message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except user_errors() as err:
            raise click.ClickException(str(err)) from err

    return wrapper


def read_sections(params_path: str, *names: str) -> list[Any]:
    params = load_params(params_path)
    return [section(params, name) for name in names]
