"""pipeline.data.shards and pipeline.data.manifest: format, determinism, validation."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipeline.data import DataError, Manifest, Sample, ShardInfo, SplitInfo, read_shard, write_shard
from pipeline.data.images import encode_png
from pipeline.data.shards import iter_ustar


def _samples(n: int, start: int = 0) -> list[Sample]:
    rng = np.random.default_rng(start)
    return [Sample(key=f"train_{i:07d}", index=i, label=i % 3,
                   image=encode_png(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)), ext="png")
            for i in range(start, start + n)]


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _reg(name: str, data: bytes = b"1") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _sample_members(key: str = "k", index: int = 0) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [_reg(f"{key}.cls", b"0"), _reg(f"{key}.idx", str(index).encode()),
            _reg(f"{key}.png", encode_png(np.zeros((2, 2), np.uint8)))]


def test_roundtrip_and_byte_identical_rewrite(tmp_path: Path) -> None:
    samples = _samples(5, start=10)
    sha = write_shard(tmp_path / "a.tar", samples)
    sha2 = write_shard(tmp_path / "b.tar", list(reversed(samples)))
    assert sha == sha2 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert read_shard(tmp_path / "a.tar", expected_sha256=sha) == samples
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_shard_is_plain_deterministic_ustar(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.tar", _samples(2))
    data = (tmp_path / "s.tar").read_bytes()
    assert len(data) % (20 * 512) == 0
    with tarfile.open(tmp_path / "s.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["train_0000000.cls", "train_0000000.idx",
                                       "train_0000000.png", "train_0000001.cls",
                                       "train_0000001.idx", "train_0000001.png"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}


def test_webdataset_reads_our_shards(tmp_path: Path) -> None:
    paths = [str(tmp_path / "train-00000.tar"), str(tmp_path / "train-00001.tar")]
    samples = _samples(7)
    write_shard(paths[0], samples[:4])
    write_shard(paths[1], samples[4:])
    got = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    assert [int(g["cls"]) for g in got] == [s.label for s in samples]
    assert [int(g["idx"]) for g in got] == [s.index for s in samples]
    assert [g["png"] for g in got] == [s.image for s in samples]


def test_read_shard_accepts_tarfile_written_ustar(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    path.write_bytes(_tar(_sample_members("a", 3) + _sample_members("b", 4)))
    assert [(s.key, s.index) for s in read_shard(path)] == [("a", 3), ("b", 4)]


def test_truncated_shard_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "train-00000.tar"
    write_shard(path, _samples(3))
    data = path.read_bytes()
    # Cut inside a member, and exactly at a member boundary (where tarfile would stop silently).
    for cut in (len(data) // 3, 3 * 512 * 2):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"train-00000\.tar.*(truncated|declares)"):
            read_shard(path)


def test_garbage_shard_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "g.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match=r"g\.tar: corrupt tar header"):
        read_shard(path)


def test_sha_mismatch_says_rerun_prepare(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    write_shard(path, _samples(2))
    with pytest.raises(DataError, match=r"corrupt or was rewritten.*aekt prepare"):
        read_shard(path, expected_sha256="0" * 64)


@pytest.mark.parametrize(("members", "match"), [
    ([_reg("k.cls"), _reg("k.idx")], "expected exactly one image"),
    ([_reg("k.idx"), _reg("k.png")], "expected exactly one image"),
    (_sample_members() + [_reg("k.pyd", b"\x80\x04N.")], "pickled payloads are never loaded"),
    (_sample_members() + [_reg("k.txt")], "unknown extension 'txt'"),
    (_sample_members() + [_reg("k.cls")], "duplicate member"),
    ([_reg("k.cls", b"-1"), *_sample_members()[1:]], "non-negative ASCII integer"),
    (_sample_members("a", 0) + _sample_members("b", 5), "not one contiguous range"),
])
def test_malformed_samples_refused(tmp_path: Path, members: list, match: str) -> None:
    path = tmp_path / "m.tar"
    path.write_bytes(_tar(members))
    with pytest.raises(DataError, match=match):
        read_shard(path)


def _manifest(tmp_path: Path) -> Manifest:
    shards = (ShardInfo("train-00000.tar", 2, 0, 2, "a" * 64),
              ShardInfo("train-00001.tar", 1, 2, 3, "b" * 64))
    return Manifest.build(dataset="toy", source={"type": "digits", "root": None},
                          classes=("x", "y"), channels=3, image_format="png", shard_size=2,
                          splits={"train": SplitInfo(3, shards, ()),
                                  "test": SplitInfo(1, (ShardInfo("test-00000.tar", 1, 0, 1,
                                                                  "c" * 64),), ("bad.jpg",))})


def test_manifest_roundtrip_and_paths(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    m.save(tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    loaded = Manifest.load(tmp_path / "m.json")
    assert loaded == m and loaded.num_classes == 2
    loaded.save(tmp_path / "m2.json")
    assert (tmp_path / "m2.json").read_text() == text  # byte-identical rewrite
    assert m.shard_paths(tmp_path, "train") == [tmp_path / "train-00000.tar",
                                                tmp_path / "train-00001.tar"]
    with pytest.raises(DataError, match="no split 'val'"):
        m.shard_paths(tmp_path, "val")


def _edit(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(("change", "match"), [
    (lambda r: r.update(dataset="other"), "does not match its content"),
    (lambda r: r["splits"]["train"]["shards"][1].update(start=3, end=4), "does not continue"),
    (lambda r: r["splits"]["train"].update(num_samples=4), "sum to 3 but num_samples is 4"),
    (lambda r: r.update(channels=2), "channels must be 1 or 3"),
    (lambda r: r["splits"]["train"]["shards"][0].update(name="x.tar"), "expected 'train-00000"),
    (lambda r: r.update(schema_version=99), "schema_version 99"),
    (lambda r: r.pop("classes"), "fields"),
])
def test_manifest_validation_names_file(tmp_path: Path, change, match: str) -> None:
    path = tmp_path / "bad.json"
    _manifest(tmp_path).save(path)
    _edit(path, change)
    with pytest.raises(DataError, match=rf"bad\.json.*{match}"):
        Manifest.load(path)


def test_manifest_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found.*aekt prepare"):
        Manifest.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(DataError, match=r"x\.json: not readable JSON"):
        Manifest.load(tmp_path / "x.json")


def test_iter_ustar_yields_members(tmp_path: Path) -> None:
    data = _tar([_reg("a.cls", b"12"), _reg("a.idx", b"")])
    assert list(iter_ustar(data, where="w")) == [("a.cls", b"12"), ("a.idx", b"")]
