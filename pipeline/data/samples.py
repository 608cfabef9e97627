"""Plain records shared by the data layer: samples, source items, errors, hashing.

A ``Sample`` is what a shard holds and what ``read_shard`` returns. A ``RawItem`` is what a source
yields before prepare verifies or encodes it; it is small and picklable so worker processes can
load and encode it themselves (a file reference or one image row, never a decoded image).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

# Split names of every manifest; ImageFolder trees call the held-out split "val" or "test".
SPLITS = ("train", "test")
# Image extensions a shard may hold: JPEG bytes are stored as given, everything else as PNG;
# data.format: raw stores decoded uint8 pixels as NumPy .npy (pipeline.data.images.encode_npy).
IMAGE_EXTS = ("jpg", "png", "npy")
# Width of the index in sample keys: 7 digits cover ImageNet-1k train (1,281,167) and keep the
# zero-padded keys sorting in index order.
KEY_DIGITS = 7


class DataError(UserError, ValueError):
    """A user-facing data problem: missing or malformed source, corrupt image or shard."""


class ImageDecodeError(DataError):
    """Image bytes that cannot be decoded (truncated, not an image, decompression bomb, ...)."""


@dataclass(frozen=True)
class Sample:
    """One stored sample: ``key`` unique in its split, ``index`` its global index in the split."""

    key: str
    index: int
    label: int
    image: bytes  # image bytes exactly as stored in the shard
    ext: str  # "png" | "jpg" | "npy" (raw uint8 pixels)


@dataclass(frozen=True)
class FileRef:
    """Bytes ``[offset, offset + size)`` of ``path`` (a whole file when ``size`` is None)."""

    path: str
    offset: int = 0
    size: int | None = None

    def read(self) -> bytes:
        """The bytes; ImageDecodeError (on_corrupt applies) for anything but a regular file."""
        try:
            check_regular(self.path, os.stat(self.path).st_mode)
            # O_NONBLOCK: even if a FIFO replaced the file since the stat, open() cannot block.
            with open(self.path, "rb", opener=_open_nonblocking) as f:
                check_regular(self.path, os.fstat(f.fileno()).st_mode)
                f.seek(self.offset)
                data = f.read(-1 if self.size is None else self.size)
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read source image: {exc}") from exc
        if self.size is not None and len(data) != self.size:
            raise DataError(f"{self.path}: expected {self.size} bytes at offset {self.offset}, "
                            f"got {len(data)}; the file changed or is truncated.")
        return data


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISDIR, "a directory"))


def check_regular(path: str | Path, mode: int) -> None:
    """ImageDecodeError unless ``mode`` (from os.stat) is a regular file's.

    Reading a FIFO blocks until a writer appears and a device may never end, so only regular
    files are ever opened as images; the caller's ``data.on_corrupt`` decides fail or skip.
    """
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
        raise ImageDecodeError(f"{path}: is {kind}, not a regular file; only regular image files "
                               "are read (a FIFO or device could block prepare forever).")


@dataclass(frozen=True)
class RawItem:
    """A source sample before encoding: a uint8 array ([H, W] or [H, W, 3]) or encoded bytes."""

    label: int
    name: str  # what errors and the manifest's ``skipped`` list call it (e.g. "train/cat/1.jpg")
    payload: np.ndarray | FileRef


def make_key(split: str, index: int) -> str:
    """Stable, dot-free sample key, e.g. ``train_0000123``."""
    return f"{split}_{index:0{KEY_DIGITS}d}"


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
