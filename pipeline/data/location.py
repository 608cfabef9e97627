"""Where shards and the logit store live: a local path or a URL (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``).

A location is a ``Path`` for a local file or folder and a ``str`` for a URL, so a URL never goes
through ``Path`` (which would fold ``s3://b/x`` into ``s3:/b/x``). Shards are opened with
webdataset's opener (``webdataset.gopen``): plain paths, ``pipe:`` commands and ``http(s)://`` (curl)
as webdataset does them, and object stores (``s3://``, ``gs://``, …) through fsspec, registered here
in webdataset's scheme table. The logit store uses the same fsspec file systems.

Credentials and endpoints come only from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's
``FSSPEC_<PROTOCOL>_<KEY>`` variables): nothing here takes them as arguments, so none can end up in
a store's attrs, a manifest, a log line or git.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import IO, Any

from pipeline.data.samples import DataError

Location = str | Path  # a local path, or a URL kept as text
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Schemes webdataset opens itself (curl, a shell pipe); every other URL scheme goes to fsspec.
_WEBDATASET_SCHEMES = frozenset({"http", "https", "sftp", "ftps", "scp", "pipe", "file"})
# Object stores opened through fsspec in webdataset's table (it ships gsutil for gs:, nothing for s3:).
OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory")
NAME_FIELD = "{name}"  # in a pipe: shards location, replaced by the shard's file name


def is_url(loc: Location) -> bool:
    """Whether ``loc`` is a URL (``scheme://…`` or a ``pipe:`` command) rather than a local path."""
    return isinstance(loc, str) and (bool(_URL.match(loc)) or loc.startswith("pipe:"))


def scheme(loc: Location) -> str:
    """The URL scheme of ``loc`` ('' for a local path)."""
    if not is_url(loc):
        return ""
    return "pipe" if str(loc).startswith("pipe:") else str(loc).split("://", 1)[0].lower()


def is_object_store(loc: Location) -> bool:
    """Whether ``loc`` is on a file system without rename or locks (anything fsspec opens that is
    not local): the store then follows the object-store protocol (docs/pipeline.md)."""
    return is_url(loc) and scheme(loc) not in ("file", "pipe")


def as_location(text: str | Path) -> Location:
    """A command-line path as a location: URLs stay text, anything else becomes a ``Path``."""
    return text if is_url(text) else Path(text)


def join(base: Location, name: str) -> Location:
    """``base``/``name``. A ``pipe:`` base is a command template: ``{name}`` is replaced by ``name``
    (e.g. ``pipe:curl -s https://host/shards/{name}``)."""
    if not is_url(base):
        return Path(base) / name
    base = str(base)
    if base.startswith("pipe:"):
        if NAME_FIELD not in base:
            raise DataError(f"{base}: a pipe: shards location is a command with {NAME_FIELD} where the shard "
                            "file name goes, e.g. 'pipe:curl -s https://host/shards/{name}'; add it.")
        return base.replace(NAME_FIELD, name)
    return f"{base.rstrip('/')}/{name}"


def filesystem(loc: Location) -> tuple[Any, str]:
    """(fsspec file system, path inside it) for ``loc``; options come from the environment only."""
    import fsspec.core  # imported here: local runs never need it

    try:
        return fsspec.core.url_to_fs(str(loc))
    except ImportError as err:  # e.g. gcsfs missing for gs://
        raise DataError(f"{loc}: no fsspec file system for '{scheme(loc)}://' is installed ({err}); install "
                        "its package (s3fs for s3://, gcsfs for gs://, adlfs for az://).") from err


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """webdataset opener for object-store URLs: an fsspec file, read ahead in large blocks."""
    fs, path = filesystem(url)
    return fs.open(path, mode, block_size=8 << 20) if mode == "rb" else fs.open(path, mode)


def _register_object_schemes(gopen_schemes: dict[str, Any]) -> None:
    for name in OBJECT_SCHEMES:
        if getattr(gopen_schemes.get(name), "__name__", "") != "gopen_ais":  # USE_AIS_FOR keeps its choice
            gopen_schemes[name] = _gopen_fsspec


def open_for_reading(loc: Location) -> IO[bytes]:
    """Open ``loc`` with webdataset's opener (object stores through fsspec). OSError if it cannot
    be opened."""
    # The module, not the package's `gopen` function of the same name; it imports torch, so only
    # the readers pay for it.
    wds_gopen = importlib.import_module("webdataset.gopen")

    _register_object_schemes(wds_gopen.gopen_schemes)
    try:
        return wds_gopen.gopen(str(loc), "rb")
    except ValueError as err:  # webdataset's answer for a scheme it has no handler for
        raise DataError(f"{loc}: cannot open this URL ({err}); shards are read from a local path, pipe:, "
                        "http(s)://, or an object store fsspec knows (s3://, gs://, …).") from err


def write_object(loc: Location, data: bytes) -> None:
    """Write ``data`` as the whole object ``loc`` in one request: an object store never shows a
    partial object, so a reader sees the old bytes or the new ones."""
    fs, path = filesystem(loc)
    fs.pipe_file(path, data)


def list_names(loc: Location) -> list[str]:
    """File names directly under the URL folder ``loc`` ([] when there is none)."""
    fs, path = filesystem(loc)
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def delete_object(loc: Location) -> None:
    fs, path = filesystem(loc)
    fs.rm_file(path)
