"""Untrusted inputs: crafted pickles, tar members, decompression bombs, corrupt images."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, ImageDecodeError, decode_image, prepare, read_shard
from pipeline.data.safe_pickle import load_cifar_pickle


def _jpeg(seed: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


# --- pickles ---------------------------------------------------------------------------------

class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the classic pickle code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_crafted_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    release = tmp_path / "cifar-100-python"
    release.mkdir()
    rows = np.zeros((2, 3072), np.uint8)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
    (release / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    (release / "test").write_bytes(pickle.dumps({"data": rows, "fine_labels": [0, 1]}, 2))
    (release / "train").write_bytes(pickle.dumps(
        {"data": _WritesMarker(marker), "fine_labels": [0, 1]}, protocol=2))
    cfg = DataConfig.from_params({"source": "cifar100", "root": str(tmp_path)})
    with pytest.raises(DataError, match=r"refusing to unpickle (builtins|io)\.open from .*train: "
                                        "not part of the official CIFAR format"):
        prepare(cfg, shards_dir=tmp_path / "s", manifest_path=tmp_path / "m.json", progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'touch pwned'\ntR.",  # protocol 0 GLOBAL os.system
    b"\x80\x02cposix\nsystem\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03.",
    b"\x80\x02cbuiltins\neval\nq\x00.",
])
def test_other_globals_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"refusing to unpickle .* from .*data_batch_1"):
        load_cifar_pickle(path)


def test_garbage_pickle_names_file(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02}q\x00(X")  # cut off mid-stream
    with pytest.raises(DataError, match=r"test_batch: not a readable CIFAR pickle"):
        load_cifar_pickle(path)


# --- tar members (shards and ImageFolder .tar sources) ---------------------------------------

def _member(name: str, data: bytes = b"", **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in fields.items():
        setattr(info, k, v)
    return info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


def _archive(*members: bytes) -> bytes:
    return b"".join(members) + bytes(1024)


_EVIL = [
    (_member("../evil.png", b"x"), "'..' escape"),
    (_member("/abs.png", b"x"), "absolute path"),
    (_member("k.png", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink|links"),
    (_member("k.png", type=tarfile.LNKTYPE, linkname="other.png"), "hard link|links"),
    (_member("k.png", type=tarfile.FIFOTYPE), "fifo"),
    (_member("k.png", type=tarfile.CHRTYPE), "device"),
    # Headers declaring 1 GiB (above the member limit) and 1 MiB (below it) in a ~2 KB file.
    (_member("k.png", size=1 << 30), "above the .*-byte limit"),
    (_member("k.png", size=1 << 20), "declares 1048576 bytes but the archive ends"),
]


@pytest.mark.parametrize(("member", "match"), _EVIL)
def test_shard_member_refused(tmp_path: Path, member: bytes, match: str) -> None:
    path = tmp_path / "train-00000.tar"
    path.write_bytes(_archive(member))
    with pytest.raises(DataError, match=rf"train-00000\.tar.*({match})"):
        read_shard(path)


@pytest.mark.parametrize(("member", "match"), [
    (_member("../evil.jpg", b"x"), "'..' escape"),
    (_member("train/cat/b.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "links"),
    (_member("train/cat/b.jpg", type=tarfile.LNKTYPE, linkname="train/cat/a.jpg"), "links"),
    (_member("train/cat/b.jpg", type=tarfile.BLKTYPE), "not a regular file"),
    (_member("train/cat/b.jpg", size=1 << 30), "above the .*-byte limit"),
    (_member("train/cat/b.jpg", size=1 << 20), "declares 1048576 bytes"),
])
def test_imagefolder_tar_member_refused(tmp_path: Path, member: bytes, match: str) -> None:
    root = tmp_path / "tree.tar"
    root.write_bytes(_archive(_member("train/cat/a.jpg", _jpeg()), member))
    cfg = DataConfig.from_params({"source": "folder", "root": str(root)})
    with pytest.raises(DataError, match=rf"tree\.tar.*({match})"):
        prepare(cfg, shards_dir=tmp_path / "s", manifest_path=tmp_path / "m.json", progress=False)
    assert not (tmp_path / "evil.jpg").exists()


# --- images ----------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit side x side PNG of zeros: ~50 KB on disk, 400 Mpixel decoded."""
    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_decompression_bomb_is_a_clear_error() -> None:
    data = _bomb_png()
    assert len(data) < 200_000
    with pytest.raises(ImageDecodeError, match=r"bomb.png: refusing to decode a possible "
                                               "decompression bomb.*MAX_IMAGE_PIXELS"):
        decode_image(data, channels=1, name="bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_warning_band_is_an_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _bomb_png(side=300)  # 90,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # 1x..2x the limit: a warning in PIL
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, channels=1, name="w.png")


def test_formats_that_shell_out_are_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # PIL would run Ghostscript
    with pytest.raises(ImageDecodeError, match=r"x\.jpg: not a recognised image"):
        decode_image(eps, channels=3, name="x.jpg")


@pytest.mark.parametrize(("data", "match"), [
    (_jpeg()[:200], "corrupt or truncated"),
    (b"<html>not an image</html>", "not a recognised image"),
    (b"", "not a recognised image"),
])
def test_corrupt_bytes_name_the_file(data: bytes, match: str) -> None:
    with pytest.raises(ImageDecodeError, match=rf"photo\.jpg: {match}"):
        decode_image(data, channels=3, name="photo.jpg")


def _folder_with_corrupt(root: Path) -> None:
    for i in range(3):
        (root / "train" / "cat").mkdir(parents=True, exist_ok=True)
        (root / "train" / "cat" / f"{i}.jpg").write_bytes(_jpeg(i))
    (root / "train" / "cat" / "1.jpg").write_bytes(_jpeg(1)[:150])  # truncated


def test_corrupt_image_fails_by_default(tmp_path: Path) -> None:
    _folder_with_corrupt(tmp_path / "tree")
    cfg = DataConfig.from_params({"source": "folder", "root": str(tmp_path / "tree")})
    with pytest.raises(ImageDecodeError, match=r"train/cat/1\.jpg: corrupt.*on_corrupt: skip"):
        prepare(cfg, shards_dir=tmp_path / "s", manifest_path=tmp_path / "m.json", progress=False)
    assert not (tmp_path / "m.json").exists()


def test_corrupt_image_skipped_and_listed(tmp_path: Path) -> None:
    _folder_with_corrupt(tmp_path / "tree")
    cfg = DataConfig.from_params({"source": "folder", "root": str(tmp_path / "tree"),
                                  "on_corrupt": "skip", "shard_size": 1})
    m = prepare(cfg, shards_dir=tmp_path / "s", manifest_path=tmp_path / "m.json", progress=False)
    train = m.splits["train"]
    assert train.skipped == ("train/cat/1.jpg",)
    assert train.num_samples == 2 and [s.count for s in train.shards] == [1, 1]
    got = [read_shard(p)[0] for p in m.shard_paths(tmp_path / "s", "train")]
    assert [s.index for s in got] == [0, 1]  # indices stay contiguous around the gap
    assert got[1].image == (tmp_path / "tree" / "train" / "cat" / "2.jpg").read_bytes()
