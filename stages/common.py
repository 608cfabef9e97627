"""Shared CLI plumbing: params loading, logging set-up, and user errors as one clear paragraph."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import ConfigError, load_params, section

PARAMS_OPTION = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="params.yaml to read sections from.")
# Options several stages share, spelled once so their defaults and help cannot drift apart.
MANIFEST_OPTION = click.option("--manifest", "manifest_path", required=True,
                               type=click.Path(exists=True, dir_okay=False),
                               help="Dataset manifest written by `aekt prepare`, e.g. manifests/digits.json.")
SHARDS_OPTION = click.option("--shards-dir", default="data/shards", show_default=True,
                             type=click.Path(file_okay=False), help="Folder of the WebDataset shards.")
TEACHER_OPTION = click.option("--teacher", "teacher_path", default="models/teacher.safetensors", show_default=True,
                              type=click.Path(dir_okay=False), help="Teacher weights (its card is beside them).")
STORE_OPTION = click.option("--store", "store_path", required=True, type=click.Path(file_okay=False),
                            help="Zarr logit store, e.g. cache/digits-digits_cnn.zarr.")
NO_PROGRESS_OPTION = click.option("--no-progress", is_flag=True, help="Hide progress bars.")


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
            raise click.ClickException(user_message(err)) from err

    return wrapper


def user_message(err: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker, the original message only.

    torch re-raises a worker's exception as the same type with the text "Caught X in DataLoader
    worker process N.\nOriginal Traceback (...)...\n<module>.X: <message>".
    """
    text = str(err)
    if "\nOriginal Traceback" in text:
        found = re.search(rf"^[\w.]*\b{type(err).__name__}: (.*)\Z", text, re.MULTILINE | re.DOTALL)
        text = found.group(1).strip() if found else text
    return text


def read_sections(params_path: str, *names: str) -> list[Any]:
    params = load_params(params_path)
    return [section(params, name) for name in names]
