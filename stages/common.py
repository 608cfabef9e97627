"""Shared CLI plumbing: params loading, logging set-up, and user errors as one clear paragraph."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

PARAMS_OPTION = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="Params file whose sections configure this stage.")
# Options several stages share, spelled once so their defaults and help cannot drift apart.
MANIFEST_OPTION = click.option("--manifest", "manifest_path", required=True,
                               type=click.Path(exists=True, dir_okay=False),
                               help="Dataset manifest written by `aekt prepare` (shard names, sample counts, sha256, "
                                    "classes), e.g. manifests/digits.json.")
def _dataset_of(ctx: click.Context) -> str | None:
    """data.name as the manifest records it, when --manifest was given (dvc.yaml's per-dataset layout)."""
    manifest = ctx.params.get("manifest_path")
    try:
        name = json.loads(Path(manifest).read_text()).get("dataset") if manifest else None
    except (OSError, ValueError, AttributeError):
        return None  # the stage reports an unreadable manifest itself, with the fix
    return name if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) else None


def _per_dataset(template: str, fallback: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def default(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is not None:
            return value
        name = _dataset_of(ctx)
        return template.format(name=name) if name else fallback
    return default


SHARDS_OPTION = click.option("--shards-dir", default=None, callback=_per_dataset("data/shards/{name}", "data/shards"),
                             type=click.Path(file_okay=False),
                             help="Folder of the WebDataset shards [default: data/shards/<the manifest's dataset>].")
TEACHER_OPTION = click.option("--teacher", "teacher_path", default=None,
                              callback=_per_dataset("models/{name}/teacher.safetensors", "models/teacher.safetensors"),
                              type=click.Path(dir_okay=False),
                              help="Teacher weights, its card beside them [default: models/<the manifest's "
                                   "dataset>/teacher.safetensors].")
STORE_OPTION = click.option("--store", "store_path", required=True, type=click.Path(file_okay=False),
                            help="Zarr logit store written by `aekt cache`, e.g. cache/digits-digits_cnn.zarr.")
NO_PROGRESS_OPTION = click.option("--no-progress", is_flag=True, help="Hide progress bars.")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input: shown as a message, not a traceback. Every module's error
    type derives from pipeline.errors.UserError, so nothing else needs importing here."""
    from pipeline.errors import UserError

    return (UserError,)


DEBUG_ENV = "AEKT_DEBUG"

# What to do about an operating-system error, by errno: these are the machine's state (a full disk,
# a read-only mount, a path that is a file), not bugs, so they get a message instead of a traceback.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free space (or point the output elsewhere) and rerun — outputs that "
                  "existed before this command are unchanged",
    errno.EFBIG: "the file grew past the size this process may write (disk quota or `ulimit -f`); raise the "
                 "limit or free space and rerun — existing outputs are unchanged",
    errno.EDQUOT: "the disk quota is exhausted; free space and rerun — existing outputs are unchanged",
    errno.EACCES: "permission denied; make the path writable/readable by this user or choose another path",
    errno.EPERM: "operation not permitted; make the path writable by this user or choose another path",
    errno.EROFS: "the file system is read-only; write the outputs elsewhere",
    errno.ENOTDIR: "a part of this path is a file, not a folder; move that file or choose another path",
    errno.EISDIR: "this path is a folder where a file is expected; pass a file path",
    errno.ENOENT: "no such file or folder; check the path (run from the repository root, or rerun the stage "
                  "that writes it)",
    errno.EEXIST: "the path already exists; remove it or choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EMFILE: "too many open files; raise `ulimit -n` or lower the worker count",
}


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def os_error_message(err: OSError) -> str:
    """One paragraph for an OSError: the path, what the system said, and the fix."""
    if err.errno is None:  # raised by our own code with a complete message
        return user_message(err)
    path = err.filename if err.filename is not None else "(no path)"
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    reason = err.strerror or type(err).__name__
    fix = _OS_FIXES.get(err.errno or -1, "check the path and the machine, then rerun")
    return f"{path}: {reason} [errno {err.errno}]; {fix}."


def stage(func: Callable[..., Any]) -> Callable[..., Any]:
    """Configure logging and turn expected failures into one paragraph and a non-zero exit.

    Expected failures are the project's user errors (bad input, bad params, damaged data) and
    operating-system errors (disk full, permissions, missing paths). Anything else is a bug and
    keeps its traceback. `aekt --debug` (or AEKT_DEBUG=1) shows the traceback for every failure.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            return func(*args, **kwargs)
        except user_errors() as err:
            if debug_enabled():
                raise
            raise click.ClickException(user_message(err)) from err
        except OSError as err:
            if debug_enabled():
                raise
            raise click.ClickException(os_error_message(err)) from err

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
    from pipeline.config import load_params, section  # here, not at the top: `aekt --help` stays fast

    params = load_params(params_path)
    return [section(params, name) for name in names]
