"""WebDataset shard writer and validating reader.

A shard is an uncompressed tar of samples ``{key}.cls``, ``{key}.idx``, ``{key}.{jpg|png|npy}``,
members sorted by (index, extension) so WebDataset sees each key's files together. Headers are
fixed (mtime 0, uid/gid 0, empty owner names, mode 0644, USTAR), so the same samples always give
the same bytes and the manifest's sha256 is reproducible. Readers trust nothing in a shard: every
member's name, type and size is checked before its bytes are read, and nothing is unpickled.

Shards are read by URL with webdataset's opener (``location.open_for_reading``: a local path,
``pipe:``, ``http(s)://``, or an object store through fsspec); the sha256 is computed as the bytes
stream in and checked before the archive is parsed, so a run over URLs reads exactly the bytes a
run over local files reads, and a corrupt shard is reported by its URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

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


_OCTAL_RE = re.compile(rb" *([0-7]+)[\x00 ]*")


def _octal(field: bytes, what: str, where: str) -> int:
    found = _OCTAL_RE.fullmatch(field)
    if found is None:
        raise DataError(f"{where}: corrupt tar header ({what} field {field!r}); {_RERUN}.")
    return int(found.group(1), 8)


def _check_headers(data: bytes, starts: list[int], where: str) -> None:
    """Checksum and magic of every header at ``starts``, in order; the first bad one is the error.

    The sums are computed for all headers at once with NumPy: summing 512 bytes in Python per
    member was a third of the time a raw-pixel shard took to read."""
    if not starts:
        return
    blocks = np.frombuffer(data, dtype=np.uint8)[np.asarray(starts)[:, None] + np.arange(BLOCK)]
    sums = (blocks[:, :148].sum(axis=1, dtype=np.int64) + blocks[:, 156:].sum(axis=1, dtype=np.int64)
            + 8 * 32).tolist()
    magic_ok = (blocks[:, 257:262] == np.frombuffer(b"ustar", dtype=np.uint8)).all(axis=1).tolist()
    for pos, total, magic in zip(starts, sums, magic_ok, strict=True):
        if _octal(data[pos + 148:pos + 156], "checksum", where) != total or not magic:
            raise DataError(f"{where}: corrupt tar header at byte {pos} (bad checksum or magic); "
                            f"{_RERUN}.")


# One C call per header: name, mode/uid/gid, size, mtime, checksum, type, link name, magic,
# version, user/group names + device numbers, prefix (POSIX ustar layout, 512 bytes).
_HEADER = struct.Struct("100s24s12s12s8sc100s6s2s80s155s12x")
# A plain member name (what our writer and WebDataset tools write): no '/', so no escape to check.
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_.-]+")


def _member(data: bytes, pos: int, size_limit: tuple[int, int], where: str) -> tuple[str, int]:
    """(name, size) of the regular-file member whose header starts at ``pos``; DataError otherwise."""
    raw_name, _, size_field, _, _, kind, _, magic, _, _, prefix = _HEADER.unpack_from(data, pos)
    raw_name = raw_name.split(b"\x00", 1)[0]
    if _PLAIN_NAME.fullmatch(raw_name) and raw_name not in (b".", b"..") and not (
            magic == b"ustar\x00" and prefix[:1] not in (b"", b"\x00")):
        name = raw_name.decode("ascii")  # the common case: nothing more to check in the name
    else:
        name = raw_name.decode("utf-8", "replace")
        prefix_text = prefix.split(b"\x00", 1)[0].decode("utf-8", "replace")
        if magic == b"ustar\x00" and prefix_text:
            name = f"{prefix_text}/{name}"
        _check_name(name, where)
    if kind not in (b"0", b"\x00"):
        if kind in _REFUSED_TYPES:
            raise DataError(f"{where}: refusing tar member {name!r}: {_REFUSED_TYPES[kind]} "
                            "(shards hold only regular files).")
        raise DataError(f"{where}: refusing tar member {name!r}: unknown type {kind!r}.")
    size = _octal(size_field, "size", where)
    _check_size(name, size, pos + BLOCK, size_limit[0], where, size_limit[1])
    return name, size


_NAME_BYTES = np.zeros(256, dtype=bool)
_NAME_BYTES[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-", dtype=np.uint8)] = True
_OCTAL_DIGITS = np.zeros(256, dtype=bool)
_OCTAL_DIGITS[np.frombuffer(b"01234567", dtype=np.uint8)] = True


def _fast_scan(data: bytes, max_member_bytes: int) -> list[tuple[str, int, int]] | None:
    """(name, data start, size) of every member when the archive is plainly valid, else None.

    The common case, a shard as our writer (or GNU/BSD tar in ustar mode) writes it, checked for
    all headers at once with NumPy: sizes as 11 octal digits + NUL, checksum as 6 octal digits +
    NUL + space and equal to the header's sum, "ustar" magic, regular-file type, no prefix, a plain
    name ([A-Za-z0-9_.-]), sizes within the limit and the archive, and the end-of-archive marker.
    Anything else returns None and the member-by-member scan gives the exact error. The chain of
    headers (each size decides where the next header is) is found with NumPy too when it can be
    (``_vector_chain``), else by hopping from header to header in Python."""
    end = len(data)
    # Headers start on 512-byte boundaries: the archive seen as rows of blocks.
    rows = np.frombuffer(data, dtype=np.uint8, count=end // BLOCK * BLOCK).reshape(-1, BLOCK)
    chain = _vector_chain(rows, end)
    if chain is None:
        chain = _hop_chain(data)
    if chain is None:
        return None
    starts, sizes = chain
    marker = starts[-1] + BLOCK + sizes[-1] + (-sizes[-1] % BLOCK) if starts else 0
    if not starts or data[marker:marker + 2 * BLOCK] != bytes(2 * BLOCK):
        return None
    return _checked_members(data, rows, starts, sizes, max_member_bytes)


_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)
_OCTAL_WEIGHTS = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _vector_chain(rows: np.ndarray, end: int) -> tuple[list[int], list[int]] | None:
    """(header starts, sizes) from every block with the "ustar" magic, if those blocks form exactly
    the chain their sizes describe from byte 0 on; None otherwise (e.g. a payload block that happens
    to hold "ustar" at offset 257, or a size field that is not 11 octal digits)."""
    cand = np.flatnonzero((rows[:, 257:262] == _USTAR).all(axis=1))
    if len(cand) == 0 or cand[0] != 0:
        return None
    digits = rows[cand, 124:135]
    if not _OCTAL_DIGITS[digits].all():
        return None
    sizes = (digits.astype(np.int64) - ord("0")) @ _OCTAL_WEIGHTS
    starts = cand.astype(np.int64) * BLOCK
    following = starts + BLOCK + (sizes + BLOCK - 1) // BLOCK * BLOCK
    if (following[:-1] != starts[1:]).any() or following[-1] + 2 * BLOCK > end:
        return None
    return starts.tolist(), sizes.tolist()


def _hop_chain(data: bytes) -> tuple[list[int], list[int]] | None:
    """(header starts, sizes) by hopping from header to header; None at anything unusual."""
    end, starts, sizes, pos = len(data), [], [], 0
    try:
        while pos + BLOCK <= end and data[pos] != 0:
            size = int(data[pos + 124:pos + 135], 8)
            if size < 0:  # "-1": would hop backwards; the member-by-member scan names it
                return None
            starts.append(pos)
            sizes.append(size)
            pos += BLOCK + size + (-size % BLOCK)
    except ValueError:
        return None
    return starts, sizes


def _checked_members(data: bytes, rows: np.ndarray, starts: list[int], sizes: list[int],
                     max_member_bytes: int) -> list[tuple[str, int, int]] | None:
    """The members at ``starts`` if every header passes the checks of ``_fast_scan``, else None."""
    end = len(data)
    blocks = rows[np.asarray(starts) // BLOCK]
    size_arr = np.asarray(sizes, dtype=np.int64)
    checksum = (blocks[:, 148:154].astype(np.int64) - ord("0")) @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    total = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    names = blocks[:, :100]
    length = np.where((names == 0).any(axis=1), (names == 0).argmax(axis=1), 100)
    in_name = np.arange(100)[None, :] < length[:, None]
    ok = (_OCTAL_DIGITS[blocks[:, 124:135]].all(axis=1) & (blocks[:, 135] == 0)
          & _OCTAL_DIGITS[blocks[:, 148:154]].all(axis=1) & (blocks[:, 154] == 0) & (blocks[:, 155] == 32)
          & (checksum == total) & (blocks[:, 257:262] == np.frombuffer(b"ustar", dtype=np.uint8)).all(axis=1)
          & ((blocks[:, 156] == ord("0")) | (blocks[:, 156] == 0)) & (blocks[:, 345] == 0)
          & (length > 0) & (_NAME_BYTES[names] | ~in_name).all(axis=1)
          & (size_arr <= max_member_bytes) & (np.asarray(starts) + BLOCK + size_arr <= end))
    if not ok.all():
        return None
    out = []
    for start, size, n in zip(starts, sizes, length.tolist(), strict=True):
        name = data[start:start + n].decode("ascii")
        if name in (".", ".."):
            return None
        out.append((name, start + BLOCK, size))
    return out


def iter_ustar(data: bytes, *, where: str,
               max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of an in-memory ustar archive, strictly validated
    (``ustar_members``)."""
    for name, start, size in ustar_members(data, where=where, max_member_bytes=max_member_bytes):
        yield name, data[start:start + size]


def ustar_members(data: bytes, *, where: str,
                  max_member_bytes: int = MAX_MEMBER_BYTES) -> list[tuple[str, int, int]]:
    """(name, data start, size) of each member of an in-memory ustar archive, strictly validated.

    Accepts only what ``write_shard`` (or any plain ustar/GNU writer) produces for regular
    files; links, devices, directories and extended headers are refused, every header checksum
    and size is checked before anything is returned, and the end-of-archive marker is required
    (a tar cut at a member boundary would otherwise read as a valid, shorter shard). Errors are
    those of the first bad header, checksum first, as if headers were checked one by one.
    """
    fast = _fast_scan(data, max_member_bytes)
    if fast is not None:
        return fast
    pos, zero, limits = 0, bytes(BLOCK), (len(data), max_member_bytes)
    starts: list[int] = []
    members: list[tuple[str, int, int]] = []
    try:
        while True:
            header = data[pos:pos + BLOCK]
            if len(header) < BLOCK:
                raise DataError(f"{where}: truncated tar (no end-of-archive marker after byte "
                                f"{pos}); {_RERUN}.")
            if header == zero:
                if data[pos + BLOCK:pos + 2 * BLOCK] != zero:
                    raise DataError(f"{where}: truncated tar (incomplete end-of-archive marker at "
                                    f"byte {pos}); {_RERUN}.")
                break
            starts.append(pos)
            name, size = _member(data, pos, limits, where)
            members.append((name, pos + BLOCK, size))
            pos += BLOCK + size + (-size % BLOCK)
    except DataError:
        _check_headers(data, starts, where)  # a bad checksum before (or at) this header wins
        raise
    _check_headers(data, starts, where)
    return members


def _parse_int(text: bytes, *, what: str, where: str) -> int:
    if not (0 < len(text) <= 20 and text.isdigit()):
        raise DataError(f"{where}: {what} must be a non-negative ASCII integer, got {text[:40]!r}.")
    return int(text)


def _collect_members(data: bytes, members: list[tuple[str, int, int]], where: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a shard's validated ``members`` (``ustar_members``), every name checked."""
    by_key: dict[str, dict[str, bytes]] = {}
    for name, start, size in members:
        payload = data[start:start + size]
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


STREAM_CHUNK = 8 << 20  # bytes per read from the opener: large reads, few calls, hashed as they arrive


def shard_bytes_from_url(path: Location, *, where: str, expected_sha256: str | None = None) -> bytes:
    """The whole shard at ``path`` (a local path or a URL), read through webdataset's opener and
    hashed as it streams; DataError naming ``where`` if it cannot be read (a missing object, a
    dropped connection, a ``pipe:`` command that fails) or its sha256 differs from ``expected_sha256``."""
    digest, parts = hashlib.sha256(), []
    try:
        with contextlib.closing(open_for_reading(path)) as stream:
            while chunk := stream.read(STREAM_CHUNK):
                digest.update(chunk)
                parts.append(chunk)
    except OSError as exc:  # also a pipe: command's non-zero exit status, raised when it is closed
        raise DataError(f"{where}: cannot read: {exc}; {_RERUN}.") from exc
    if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
        raise DataError(f"{where}: sha256 {digest.hexdigest()} does not match the manifest's "
                        f"{expected_sha256}: the shard is corrupt or was rewritten; {_RERUN}.")
    return b"".join(parts)


def _writer_layout(data: bytes, members: list[tuple[str, int, int]], num_classes: int | None) -> list[Sample] | None:
    """The samples of a shard in exactly the layout ``shard_bytes`` writes, else None.

    Per sample, in index order: ``k.cls``, ``k.idx``, ``k.<jpg|png|npy>``, with a plain key, ASCII
    digits, labels below ``num_classes``, unique keys and contiguous indices. Checked with list
    comprehensions over the whole shard instead of per member (a third of a raw shard's read time
    went to that per-member Python); anything else returns None and ``read_shard``'s general path
    gives the exact error. ``members`` are ``ustar_members``'s, already validated as a tar."""
    if not members or len(members) % 3:
        return None
    names = [m[0] for m in members]
    keys = [n[:-4] for n in names[0::3]]
    exts = [m.rpartition(".")[2] for m in names[2::3]]
    if not (all(n.endswith(".cls") for n in names[0::3]) and [n[:-4] for n in names[1::3]] == keys
            and all(n.endswith(".idx") for n in names[1::3]) and all(e in IMAGE_EXTS for e in exts)
            and [m[:-len(e) - 1] for m, e in zip(names[2::3], exts, strict=True)] == keys
            and all(k and "." not in k for k in keys) and len(set(keys)) == len(keys)):
        return None
    texts = [data[start:start + size] for _, start, size in members]
    if not all(0 < len(t) <= 20 and t.isdigit() for t in (*texts[0::3], *texts[1::3])):
        return None
    labels, indices = [int(t) for t in texts[0::3]], [int(t) for t in texts[1::3]]
    if indices != list(range(indices[0], indices[0] + len(indices))) or (
            num_classes is not None and max(labels) >= num_classes):
        return None
    return [Sample(key=k, index=i, label=y, image=img, ext=e)
            for k, i, y, img, e in zip(keys, indices, labels, texts[2::3], exts, strict=True)]


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
    data = shard_bytes_from_url(path, where=where, expected_sha256=expected_sha256)
    members = ustar_members(data, where=where, max_member_bytes=max_member_bytes)
    fast = _writer_layout(data, members, num_classes)
    if fast is not None:
        return fast
    samples = []
    for key, files in _collect_members(data, members, where).items():
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
