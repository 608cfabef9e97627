"""Shared CLI plumbing: params loading, logging set-up, and user errors as one clear paragraph."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

PARAMS_OPTION = click.option("--params", "params_path", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="Params file whose sections configure this stage.")

# A path left out on the command line is the one dvc.yaml passes: dvc.yaml names every file after
# params.yaml's data.name (and the store after teacher.arch too). In a template, {data_name} and
# {arch} are those two keys and {dataset} is the dataset the --manifest names (by default
# manifests/<data.name>.json, so data.name again): another manifest brings its own shards and models.
_SHOWN = {"dataset": "<dataset>", "data_name": "<data.name>", "arch": "<teacher.arch>"}
_PATH_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # what config.py accepts for data.name


def layout_default(template: str, written_by: str | None = None) -> dict[str, Any]:
    """click.option keywords for a path that defaults to dvc.yaml's ``template``: --help shows it as
    `[default: manifests/<data.name>.json]`, and a left-out option gets it filled from params.yaml.
    ``written_by``: the path must be an existing file, which that command writes (checked here: as
    the option's type, click.Path would check the shown template itself)."""
    return {"default": template.format(**_SHOWN), "show_default": True,
            "callback": functools.partial(_fill_layout, template, written_by)}


def _fill_layout(template: str, written_by: str | None, ctx: click.Context, param: click.Parameter,
                 value: Any) -> Any:
    left_out = ctx.get_parameter_source(param.name or "") is click.core.ParameterSource.DEFAULT
    if left_out:
        value = template.format(**{key: _layout_field(ctx, param, key) for key in _SHOWN if f"{{{key}}}" in template})
    if written_by is None:
        return value
    try:
        return click.Path(exists=True, dir_okay=False).convert(value, param, ctx)
    except click.BadParameter as err:
        if left_out:
            err.message += (f" ({param.opts[0]} was left out, so it is {template.format(**_SHOWN)} from "
                            f"{ctx.params.get('params_path', 'params.yaml')}; run `{written_by}` first, or pass "
                            f"{param.opts[0]} PATH.)")
        raise


def _layout_field(ctx: click.Context, param: click.Parameter, key: str) -> str:
    if key == "dataset":
        return _dataset_of(ctx) or _layout_field(ctx, param, "data_name")
    if key == "data_name":
        return _params_section(ctx, param, "data").name  # config.py checks that it is a file name
    arch = _params_section(ctx, param, "teacher").arch
    if not _PATH_PART.fullmatch(arch):
        raise click.BadParameter(f"params.yaml teacher.arch {arch!r} cannot be part of a path; pass "
                                 f"{param.opts[0]} PATH.", ctx, param)
    return arch


def _params_section(ctx: click.Context, param: click.Parameter, name: str) -> Any:
    """Section ``name`` of the params file this command reads (--params is parsed first: it comes
    first in every command, and an option given on the command line is parsed before a left-out one)."""
    from pipeline.config import load_params, section

    path = ctx.params.get("params_path", "params.yaml")
    try:
        with expected_failures():
            return section(load_params(path), name)
    except click.ClickException as err:
        err.message += f" ({param.opts[0]} was left out and its default comes from {path}; or pass it.)"
        raise


def _dataset_of(ctx: click.Context) -> str | None:
    """The dataset the command's --manifest records. A --manifest given on the command line is
    parsed before every left-out option; a left-out one is manifests/<data.name>.json anyway."""
    manifest = ctx.params.get("manifest_path")
    try:
        name = json.loads(Path(manifest).read_text()).get("dataset") if manifest else None
    except (OSError, ValueError, AttributeError):
        return None  # the stage reports an unreadable manifest itself, with the fix
    return name if isinstance(name, str) and _PATH_PART.fullmatch(name) else None


# Options several stages share, spelled once so their defaults and help cannot drift apart.
MANIFEST_OPTION = click.option("--manifest", "manifest_path", type=click.Path(dir_okay=False),
                               **layout_default("manifests/{data_name}.json", written_by="aekt prepare"),
                               help="Dataset manifest written by `aekt prepare` (shard names, sample counts, "
                                    "sha256, classes); <dataset> in the other defaults is the dataset it names.")
SHARDS_OPTION = click.option("--shards-dir", type=click.Path(file_okay=False),
                             **layout_default("data/shards/{dataset}"), help="Folder of the WebDataset shards.")
TEACHER_OPTION = click.option("--teacher", "teacher_path", type=click.Path(dir_okay=False),
                              **layout_default("models/{dataset}/teacher.safetensors"),
                              help="Teacher weights written by `aekt teacher` (its card beside them).")
STORE_OPTION = click.option("--store", "store_path", type=click.Path(file_okay=False),
                            **layout_default("cache/{dataset}-{arch}.zarr"),
                            help="Zarr logit store written by `aekt cache`.")
NO_PROGRESS_OPTION = click.option("--no-progress", is_flag=True,
                                 help="Hide progress bars (a log record with the ETA every 30 s remains).")


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
        with expected_failures():
            return func(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def expected_failures() -> Iterator[None]:
    """User errors and OS errors become click's one-paragraph `Error: ...` (exit 1), or keep their
    traceback under --debug."""
    try:
        yield
    except user_errors() as err:
        if debug_enabled():
            raise
        raise click.ClickException(user_message(err)) from err
    except OSError as err:
        if debug_enabled():
            raise
        raise click.ClickException(os_error_message(err)) from err


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


def live_option(stage_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--live: the dvclive folder a training stage logs to while it runs (pipeline/live.py)."""
    return click.option("--live", "live_dir", default=None, type=click.Path(file_okay=False),
                        help=f"dvclive folder for live metrics (per epoch; loss terms ~20 times per epoch go to "
                             f"<folder>-steps), read by `dvc exp show`/`dvc plots` while it trains; dvc.yaml "
                             f"passes dvclive/{stage_name} [default: none, no live metrics].")


def echo_once(text: str) -> None:
    """The stage's closing line, from the main process only (a multi-process run printed it N times)."""
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(text)

