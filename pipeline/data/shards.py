"""WebDataset shard writer and validating reader.

A shard is an uncompressed tar of samples ``{key}.cls``, ``{key}.idx``, ``{key}.{jpg|png|npy}``,
members sorted by (index, extension) so WebDataset sees each key's files together. Headers are
fixed (mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR), so the same samples always give
the same bytes and the manifest's sha256 is reproducible. Readers trust nothing in a shard: every
member's name, type and size is checked before its bytes are read, and nothing is unpickled.

Shards are read as a stream from webdataset's opener (``location.open_for_reading``: a local path,
``pipe:``, ``http(s)://``, or an object store through fsspec): each header is validated before its
member's bytes are read, and the sha256 is computed as the bytes pass and checked when the stream
ends, so a run over URLs reads exactly the bytes a run over local files reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from pipeline.data.location import Location, as_location, open_for_reading
from pipeline.data.samples import IMAGE_EXTS, DataError, Sample

# Bounds a member before its bytes are read: the largest ImageNet JPEG is ~15 MB.
MAX_MEMBER_BYTES = 64 << 20
SHARD_EXTS = frozenset({"cls", "idx", *IMAGE_EXTS})
# Extensions that other WebDataset tools decode by unpickling: named in the refusal message.
PICKLE_EXTS = frozenset({"pyd", "pickle", "pkl", "pth", "pt"})
BLOCK, RECORD = 512, 20 * 512
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_RERUN = "rerun `aekt prepare` (or `dvc repro prepare`) to rebuild the shards"


def shard_name(split: str, number: int) -> str:
    """File name of shard ``number`` of ``split``, e.g. ``train-00003.tar``."""
    return f"{split}-{number:05d}.tar"


def _header_template() -> tuple[bytes, int]:
    header = bytearray(BLOCK)
    header[100:124] = b"0000644\x00" + b"0000000\x00" * 2  # mode, uid 0, gid 0
    header[136:148] = b"00000000000\x00"  # mtime 0
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_TEMPLATE, _TEMPLATE_SUM = _header_template()


def _ustar_header(name: str, size: int) -> bytes:
    """512-byte POSIX ustar header of a regular file with fixed metadata.

    Built by hand rather than with tarfile: tarfile's header bytes have changed between Python
    versions (e.g. devmajor fields), which would change every shard's sha256; it is also ~10x
    slower, and the parent process writes every shard. Only name, size and checksum vary.
    """
    raw = name.encode("ascii")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    size_field = b"%011o\x00" % size
    checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, _TEMPLATE[len(raw):124], size_field, _TEMPLATE[136:148],
                     b"%06o\x00 " % checksum, _TEMPLATE[156:]))


def shard_bytes(samples: Iterable[Sample], *, where: str = "shard") -> bytes:
    """The deterministic tar of ``samples`` (sorted by index), end marker and padding included."""
    chunks = []
    for s in sorted(samples, key=lambda s: s.index):
        if not _KEY_RE.fullmatch(s.key) or s.ext not in IMAGE_EXTS:
            raise ValueError(f"invalid sample key {s.key!r} or ext {s.ext!r} for {where}")
        for ext, data in (("cls", str(s.label).encode()), ("idx", str(s.index).encode()),
                          (s.ext, s.image)):
            chunks += [_ustar_header(f"{s.key}.{ext}", len(data)), data,
                       bytes(-len(data) % BLOCK)]
    chunks.append(bytes(2 * BLOCK))  # end-of-archive marker
    # Pad to a whole 10 KiB record like tar(1) and tarfile, for tools that expect it.
    chunks.append(bytes(-sum(map(len, chunks)) % RECORD))
    return b"".join(chunks)  # one copy; hashing many small chunks costs more than this


def write_shard(path: str | Path, samples: Iterable[Sample]) -> str:
    """Write ``samples`` as a deterministic tar at ``path`` atomically; return its sha256.

    The tar is written to a temporary name in the same directory and renamed, so a reader never
    sees a half-written shard. There is no fsync (it tripled the write time of CIFAR shards): a
    shard torn by a power cut fails its manifest sha256 check and prepare is rerun.
    """
    path = Path(path)
    data = shard_bytes(samples, where=str(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()


def _check_name(name: str, where: str) -> None:
    if name.startswith("/") or ".." in name.split("/") or "\\" in name or "\x00" in name:
        raise DataError(f"{where}: refusing tar member {name!r}: absolute path or '..' escape.")


def check_tar_member(info: tarfile.TarInfo, *, archive_bytes: int, where: str,
                     max_member_bytes: int = MAX_MEMBER_BYTES) -> None:
    """Refuse unsafe or impossible members of a tarfile archive (ImageFolder .tar sources).

    Path escapes, links, devices, fifos, sparse and oversized members are refused; a header
    declaring more data than the file holds (``archive_bytes``) is corrupt, and is rejected
    before anything is allocated for it.
    """
    _check_name(info.name, where)
    if info.issym() or info.islnk():
        raise DataError(f"{where}: refusing tar member {info.name!r}: links are not allowed "
                        f"(-> {info.linkname!r}).")
    if info.isdir():
        return
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise DataError(f"{where}: refusing tar member {info.name!r}: not a regular file "
                        f"(type {info.type!r}: device, fifo, sparse or unknown).")
    _check_size(info.name, info.size, info.offset_data, archive_bytes, where, max_member_bytes,
                hint="")


def _check_size(name: str, size: int, offset: int, archive_bytes: int, where: str,
                max_member_bytes: int, *, hint: str = f"; {_RERUN}") -> None:
    if size > max_member_bytes:
        raise DataError(f"{where}: refusing tar member {name!r}: declares {size} bytes, above "
                        f"the {max_member_bytes}-byte limit.")
    if offset + size > archive_bytes:
        raise DataError(f"{where}: tar member {name!r} declares {size} bytes but the archive "
                        f"ends at byte {archive_bytes}: truncated or corrupt{hint}.")


# ustar type flags we refuse in shards, with the reason shown to the user.
_REFUSED_TYPES = {b"1": "a hard link", b"2": "a symlink", b"3": "a character device",
                  b"4": "a block device", b"5": "a directory", b"6": "a fifo",
                  b"x": "a pax extended header", b"g": "a pax global header",
                  b"L": "a GNU long name", b"K": "a GNU long link name", b"S": "a sparse file"}


def _octal(field: bytes, what: str, where: str) -> int:
    text = field.rstrip(b"\x00 ").lstrip(b" ")
    if not text or text.strip(b"01234567"):
        raise DataError(f"{where}: corrupt tar header ({what} field {field!r}); {_RERUN}.")
    return int(text, 8)


class ShardReader:
    """A shard's byte stream, hashed as it is read; ``finish`` reads to the end and checks the sha256.

    Reads are exact (``read(n)`` returns fewer than n bytes only at the end of the stream) and an
    OSError while streaming (a dropped connection, a failing pipe) becomes a DataError naming the
    shard. The sha256 covers every byte of the stream, including what follows the end marker.
    """

    def __init__(self, raw: IO[bytes], *, where: str, expected_sha256: str | None = None):
        self.raw, self.where, self.expected = raw, where, expected_sha256
        self.hash = hashlib.sha256()
        self.finished = False

    def read(self, n: int) -> bytes:
        parts, want = [], n
        while want > 0:
            try:
                chunk = self.raw.read(want)
            except OSError as exc:
                raise DataError(f"{self.where}: cannot read: {exc}; {_RERUN}.") from exc
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self.hash.update(data)
        return data

    def finish(self) -> None:
        """Read the rest of the stream, close it (a ``pipe:`` command's exit status is checked here),
        and raise if the sha256 differs from the manifest's."""
        if self.finished:
            return
        self.finished = True
        try:
            while self.read(1 << 20):
                pass
        except DataError:
            self.close()
            raise
        try:
            self.raw.close()
        except OSError as exc:
            raise DataError(f"{self.where}: cannot read: {exc}; {_RERUN}.") from exc
        actual = self.hash.hexdigest()
        if self.expected is not None and actual != self.expected:
            raise DataError(f"{self.where}: sha256 {actual} does not match the manifest's "
                            f"{self.expected}: the shard is corrupt or was rewritten; {_RERUN}.")

    def close(self) -> None:
        """Close without checking (after an error, or when the reader stops early)."""
        with contextlib.suppress(OSError):
            self.raw.close()


def open_shard(path: Location, *, where: str, expected_sha256: str | None = None) -> ShardReader:
    """Open the shard at ``path`` (local path or URL) with webdataset's opener, for ``iter_ustar``."""
    try:
        raw = open_for_reading(path)
    except OSError as exc:
        raise DataError(f"{where}: cannot read: {exc}; {_RERUN}.") from exc
    return ShardReader(raw, where=where, expected_sha256=expected_sha256)


def iter_ustar(data: bytes | ShardReader, *, where: str,
               max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of a ustar archive (bytes, or a stream from ``open_shard``),
    strictly validated.

    Accepts only what ``write_shard`` (or any plain ustar/GNU writer) produces for regular
    files; links, devices, directories and extended headers are refused, every header checksum
    and size is checked before its data is read, and the end-of-archive marker is required
    (a tar cut at a member boundary would otherwise read as a valid, shorter shard). A stream's
    sha256 is checked when it ends; any error on a stream whose sha256 differs from the manifest's
    is reported as that mismatch (the shard is corrupt: the bytes, not the parser, are at fault).
    """
    src = ShardReader(io.BytesIO(data), where=where) if isinstance(data, bytes | bytearray) else data
    try:
        yield from _ustar_members(src, where, max_member_bytes)
        src.finish()
    except DataError as err:
        if not src.finished:
            src.finish()  # raises the sha256 mismatch instead, when there is one
        raise err from None
    finally:
        src.close()


def _ustar_members(src: ShardReader, where: str, max_member_bytes: int) -> Iterator[tuple[str, bytes]]:
    pos, zero = 0, bytes(BLOCK)
    while True:
        header = src.read(BLOCK)
        if len(header) < BLOCK:
            raise DataError(f"{where}: truncated tar (no end-of-archive marker after byte "
                            f"{pos}); {_RERUN}.")
        if header == zero:
            if src.read(BLOCK) != zero:
                raise DataError(f"{where}: truncated tar (incomplete end-of-archive marker at "
                                f"byte {pos}); {_RERUN}.")
            return
        checksum = _octal(header[148:156], "checksum", where)
        if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]) or \
                not header[257:262] == b"ustar":
            raise DataError(f"{where}: corrupt tar header at byte {pos} (bad checksum or magic); "
                            f"{_RERUN}.")
        name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\x00" and prefix:
            name = f"{prefix}/{name}"
        _check_name(name, where)
        kind = header[156:157]
        if kind in _REFUSED_TYPES:
            raise DataError(f"{where}: refusing tar member {name!r}: {_REFUSED_TYPES[kind]} "
                            "(shards hold only regular files).")
        if kind not in (b"0", b"\x00"):
            raise DataError(f"{where}: refusing tar member {name!r}: unknown type {kind!r}.")
        size = _octal(header[124:136], "size", where)
        _check_size(name, size, 0, size, where, max_member_bytes)  # the limit, before reading
        payload = src.read(size + (-size % BLOCK))
        _check_size(name, size, pos + BLOCK, pos + BLOCK + len(payload), where, max_member_bytes)
        yield name, payload[:size]
        pos += BLOCK + len(payload)


def _parse_int(text: bytes, *, what: str, where: str) -> int:
    if not (0 < len(text) <= 20 and text.isdigit()):
        raise DataError(f"{where}: {what} must be a non-negative ASCII integer, got {text[:40]!r}.")
    return int(text)


def _collect_members(data: bytes, where: str, max_member_bytes: int) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for a shard's bytes, with every member checked before it is read."""
    by_key: dict[str, dict[str, bytes]] = {}
    for name, payload in iter_ustar(data, where=where, max_member_bytes=max_member_bytes):
        key, dot, ext = name.partition(".")
        if not dot or not _KEY_RE.fullmatch(key):
            raise DataError(f"{where}: member {name!r} is not '<key>.<ext>'.")
        if ext in PICKLE_EXTS:
            raise DataError(f"{where}: refusing member {name!r}: pickled payloads are never "
                            "loaded from shards.")
        if ext not in SHARD_EXTS:
            raise DataError(f"{where}: member {name!r} has unknown extension {ext!r}; expected "
                            f"one of {', '.join(sorted(SHARD_EXTS))}.")
        if ext in by_key.setdefault(key, {}):
            raise DataError(f"{where}: duplicate member {name!r}.")
        by_key[key][ext] = payload
    return by_key


def read_shard(path: Location, *, expected_sha256: str | None = None,
               num_classes: int | None = None,
               max_member_bytes: int = MAX_MEMBER_BYTES) -> list[Sample]:
    """Read and validate one shard; return its samples sorted by index.

    Raises DataError naming the shard for a sha256 mismatch, a corrupt or truncated tar, unsafe
    members, unknown extensions, a key missing its ``.cls``/``.idx``/image, a label outside
    ``[0, num_classes)`` (when given), or indices that are not one contiguous range.
    ``Manifest.read_shard`` passes the manifest's sha256 and class count.
    """
    path = as_location(path)
    where = f"shard {path}"
    data = open_shard(path, where=where, expected_sha256=expected_sha256)  # sha256 checked as it streams
    samples = []
    for key, files in _collect_members(data, where, max_member_bytes).items():
        images = [e for e in IMAGE_EXTS if e in files]
        missing = [e for e in ("cls", "idx") if e not in files] + ([] if images else ["jpg|png|npy"])
        if missing or len(images) > 1:
            raise DataError(f"{where}: sample {key!r} has members {sorted(files)}; expected "
                            "exactly one image (.jpg, .png or raw .npy pixels) plus .cls and .idx.")
        label = _parse_int(files["cls"], what=f"{key}.cls", where=where)
        if num_classes is not None and label >= num_classes:  # _parse_int refuses negatives
            raise DataError(f"{where}: sample {key!r} has label {label}, outside the manifest's "
                            f"{num_classes} classes (valid labels 0..{num_classes - 1}); the shard "
                            f"does not belong to this dataset; {_RERUN}.")
        samples.append(Sample(key=key, image=files[images[0]], ext=images[0], label=label,
                              index=_parse_int(files["idx"], what=f"{key}.idx", where=where)))
    samples.sort(key=lambda s: s.index)
    if samples and [s.index for s in samples] != list(range(samples[0].index,
                                                            samples[0].index + len(samples))):
        raise DataError(f"{where}: sample indices are not one contiguous range; {_RERUN}.")
    return samples
