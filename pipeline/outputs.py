"""Writing report sets (JSON, CSV, PNG, standard output) of `aekt inspect`, `verify-cache`, `cache`
and `evaluate` so that a full disk is one clear error and the previous files survive it.

Every file is written to a temporary name beside it and renamed into place; a batch (the plots of
`aekt inspect`) is renamed only once every file of it is written, so a failure leaves the old set
whole. ENOSPC, EFBIG (a file-size limit: `ulimit -f`, which CPython reports as an error because it
ignores SIGXFSZ) and EDQUOT are the same condition to the user: no room to write.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import UserError

NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class NoRoomError(UserError, OSError):
    """An output could not be written for lack of space; the message names it and the fix."""


def no_room_error(where: str, err: OSError, rerun: str) -> NoRoomError:
    return NoRoomError(f"{where}: writing failed — {err.strerror} [errno {err.errno}]: the disk is full or "
                      "a file-size limit (`ulimit -f`, a quota) is reached. Free space (or raise the "
                      f"limit) and rerun `{rerun}`; files written before this command are unchanged.")


def temp_path(path: Path) -> Path:
    """``.<stem>.tmp<suffix>`` beside ``path``: hidden, and the suffix still tells matplotlib the format."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def with_path(err: OSError, path: str | Path) -> OSError:
    """``err`` naming ``path`` when it names none (a failed write() reports no file name)."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, err.strerror, str(path))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """One file: a temporary path beside ``path`` to write; on success it is renamed onto ``path`` (so
    a full disk never leaves a partial file under the final name, and the previous file survives any
    failure), on failure it is removed. OSErrors name ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise with_path(err, path) from err
        raise


def write_files(writers: dict[Path, Callable[[Path], object]], *, rerun: str) -> list[Path]:
    """A set of files, all or nothing: call each ``writer(temp)``, then rename every temp file into
    place; on any failure remove the temp files and leave the existing files untouched. Returns the
    paths written."""
    temps = {path: temp_path(path) for path in writers}
    current = next(iter(writers), None)
    try:
        for current, write in writers.items():
            current.parent.mkdir(parents=True, exist_ok=True)
            write(temps[current])
    except BaseException as err:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in NO_ROOM:
            raise no_room_error(str(current), err, rerun) from err
        raise
    for path, temp in temps.items():  # renames need no space
        os.replace(temp, path)
    return list(writers)


def write_text(path: Path, text: str, *, rerun: str) -> Path:
    write_files({path: lambda temp: temp.write_text(text)}, rerun=rerun)
    return path


def echo(text: str, *, rerun: str) -> None:
    """Print ``text`` and a newline to standard output, failing loudly when it cannot be written.

    With unbuffered output (PYTHONUNBUFFERED, as the tests and DVC runs use) CPython's text layer
    ignores a short write, so a report redirected to a full disk would be cut off while the command
    exits 0; this writes the bytes itself until all are written or the system reports the error."""
    sys.stdout.flush()
    out = sys.stdout.buffer
    data = memoryview((text + "\n").encode())
    try:
        while data:
            written = out.write(data)
            if not written:  # a blocking stream that takes nothing: do not spin
                raise OSError(errno.EIO, "standard output accepted no bytes")
            data = data[written:]
        out.flush()
    except OSError as err:
        if err.errno not in NO_ROOM:
            raise
        raise no_room_error("standard output", err, rerun) from err
