"""Raw-pixel shards (data.format: raw) and batch-level streaming give the model the same pixels.

Raw shards hold decoded uint8 pixels as ``.npy`` members; the loader cuts whole batches from each
shard's tensors. Both are speed changes only: these tests prove the batches, the teacher trained on
them and the stage-1 store are identical to the encoded (PNG/JPEG) per-sample path.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from pipeline.cache.store import LogitStore
from pipeline.config import DataConfig
from pipeline.data import DataError, Manifest, decode_image, prepare, read_shard
from pipeline.data.images import decode_stack, encode_npy, npy_header, npy_shape
from pipeline.data.samples import ImageDecodeError
from pipeline.stream import ShardStream, StreamSpec


def spec(root: Path, **kw: object) -> StreamSpec:
    base: dict = dict(manifest_path=root / "manifest.json", shards_dir=root / "shards", split="train",
                      recipe="digits", image_size=224, aug_seed=0, views=2, store_path=root / "store.zarr")
    return StreamSpec(**(base | kw))


def collated(stream: ShardStream, batch_size: int, workers: int) -> list[dict]:
    """The batches of the per-sample path: per-sample dicts through torch's default collate."""
    return list(DataLoader(stream, batch_size=batch_size, num_workers=workers))


def batched(stream: ShardStream, batch_size: int, workers: int) -> list[dict]:
    return list(DataLoader(stream.batched(batch_size), batch_size=None, num_workers=workers))


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


# ---- the .npy member --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3), (7, 300, 3), (1, 1, 1)])
def test_npy_bytes_are_what_numpy_writes_and_reads(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_npy(pixels)
    buf = io.BytesIO()
    np.save(buf, pixels, allow_pickle=False)
    assert data == buf.getvalue()  # any NumPy / WebDataset reader opens our members
    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), pixels)
    assert len(npy_header(shape)) % 64 == 0 and npy_shape(data, name="x") == shape
    chw = decode_image(data, channels=shape[2], name="x")
    assert chw.shape == (shape[2], *shape[:2]) and np.array_equal(chw.permute(1, 2, 0).numpy(), pixels)


def test_greyscale_pixels_get_a_channel_axis() -> None:
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert npy_shape(encode_npy(pixels), name="x") == (8, 8, 1)
    assert torch.equal(decode_image(encode_npy(pixels), channels=1, name="x")[0], torch.from_numpy(pixels))


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[:-1], "truncated or corrupt"),
    (lambda d: d + b"\0", "truncated or corrupt"),
    (lambda d: d.replace(b"|u1", b"<f4"), "C-order uint8"),
    (lambda d: d.replace(b"False", b"True "), "C-order uint8"),
    (lambda d: d.replace(b"(4, 4, 3)", b"(4, 4, 2)"), "C-order uint8"),
    (lambda d: d.replace(b"'shape'", b"'shap3'"), "corrupt .npy header"),
    (lambda d: d[:10] + b"__import__('os')" + d[26:], "corrupt .npy header"),
    (lambda d: b"\x93NUMPX" + d[6:], "not a recognised image"),  # not .npy: PIL says what it is
])
def test_a_mangled_npy_member_is_a_clear_error(mangle, message: str) -> None:
    data = mangle(encode_npy(np.zeros((4, 4, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError, match=message) as err:
        decode_image(data, channels=3, name="train-00000.tar:train_0000007")
    assert "train_0000007" in str(err.value)


def test_raw_pixels_of_another_channel_count_are_refused() -> None:
    with pytest.raises(ImageDecodeError, match="3 channels, the dataset 1"):
        decode_image(encode_npy(np.zeros((4, 4, 3), dtype=np.uint8)), channels=1, name="s")


def test_decode_stack_takes_the_fast_path_only_for_one_shape() -> None:
    rng = np.random.default_rng(1)
    same = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(4)]
    out = decode_stack([encode_npy(p) for p in same], channels=3, names=list("abcd"))
    assert isinstance(out, torch.Tensor) and out.shape == (4, 3, 5, 6)
    assert all(np.array_equal(out[i].permute(1, 2, 0).numpy(), p) for i, p in enumerate(same))
    out[0, 0, 0, 0] = 7  # writable, not a view of the shard's bytes
    mixed = decode_stack([encode_npy(same[0]), encode_npy(same[1][:4])], channels=3, names=["a", "b"])
    assert isinstance(mixed, list) and [m.shape for m in mixed] == [(3, 5, 6), (3, 4, 6)]


# ---- prepare --------------------------------------------------------------------------------

def _prepare(tmp_path: Path, fmt: str, **cfg: object) -> tuple[Manifest, Path]:
    shards = tmp_path / fmt
    manifest = prepare(DataConfig(format=fmt, **cfg), shards_dir=shards, manifest_path=tmp_path / f"{fmt}.json",
                       progress=False)
    return manifest, shards


def test_raw_digits_shards_hold_the_pixels_the_png_shards_decode_to(tmp_path: Path) -> None:
    raw, raw_dir = _prepare(tmp_path, "raw", shard_size=100)
    png, png_dir = _prepare(tmp_path, "encoded", shard_size=100)
    assert (raw.image_format, raw.image_shape, png.image_format, png.image_shape) == ("raw", (8, 8, 1), "png", None)
    assert raw.sha256 != png.sha256 and raw.splits.keys() == png.splits.keys()
    for split, info in raw.splits.items():
        assert [(s.start, s.end) for s in info.shards] == [(s.start, s.end) for s in png.splits[split].shards]
        for shard in range(len(info.shards)):
            a, b = raw.read_shard(raw_dir, split, shard), png.read_shard(png_dir, split, shard)
            assert [(s.key, s.label, s.ext) for s in a] == [(s.key, s.label, "npy") for s in b]
            assert torch.equal(decode_stack([s.image for s in a], channels=1, names=[s.key for s in a]),
                               decode_stack([s.image for s in b], channels=1, names=[s.key for s in b]))
    again, _ = _prepare(tmp_path / "again", "raw", shard_size=100)
    assert again.sha256 == raw.sha256  # deterministic bytes
    assert Manifest.load(tmp_path / "raw.json") == raw


def test_raw_cifar10_shards_hold_the_decoded_jpeg_pixels(shared_data: Path, tmp_path: Path) -> None:
    cfg = dict(source="folder", name="c10", root=str(shared_data / "cifar10-images"), max_per_class=4, shard_size=16)
    raw, raw_dir = _prepare(tmp_path, "raw", **cfg)
    jpg, jpg_dir = _prepare(tmp_path, "encoded", **cfg)
    assert (raw.image_shape, jpg.image_format) == ((32, 32, 3), "jpg")
    base = dict(split="train", recipe="cifar", image_size=32, aug_seed=3, views=4, store_path=None)
    for root, m in ((raw_dir, raw), (jpg_dir, jpg)):
        (root / "manifest.json").write_text(m.to_json())
    streams = [ShardStream(StreamSpec(manifest_path=d / "manifest.json", shards_dir=d, **base), epoch=2)
               for d in (raw_dir, jpg_dir)]
    assert_same_batches(batched(streams[0], 12, 0), batched(streams[1], 12, 0))
    assert_same_batches(batched(streams[0], 12, 0), collated(streams[1], 12, 0))  # == today's JPEG path


def test_raw_needs_one_image_size_and_says_what_to_use(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tree / split / cls).mkdir(parents=True)
            for i, size in enumerate([(6, 5), (6, 5), (7, 5)] if (split, cls) == ("train", "b") else [(6, 5)]):
                Image.new("RGB", size, (i, 2, 3)).save(tree / split / cls / f"{i}.png")
    with pytest.raises(DataError, match=r"train/b/2.png.*5x7.*5x6.*data.format: encoded") as err:
        _prepare(tmp_path, "raw", source="folder", name="t", root=str(tree))
    assert "unchanged" in str(err.value) and not (tmp_path / "raw.json").exists()
    assert not [p for p in (tmp_path / "raw").rglob("*") if p.is_file()]  # nothing half-written
    m, _ = _prepare(tmp_path, "encoded", source="folder", name="t", root=str(tree))
    assert m.image_format == "png"


def test_a_raw_manifest_without_its_image_shape_is_refused(tmp_path: Path) -> None:
    m, _ = _prepare(tmp_path, "raw", max_per_class=3)
    broken = dataclasses.replace(m, image_shape=None)
    text = json.loads(broken.to_json())
    (tmp_path / "broken.json").write_text(json.dumps(text))
    with pytest.raises(DataError, match="fields .* expected"):
        Manifest.load(tmp_path / "broken.json")
    with pytest.raises(DataError, match="image_shape"):
        Manifest.build(dataset="d", source={}, classes=("a",), channels=3, image_format="raw", shard_size=1,
                       splits=m.splits, image_shape=(8, 8, 1))


def test_a_shard_member_of_the_wrong_type_names_the_sample(tmp_path: Path) -> None:
    _, shards = _prepare(tmp_path, "raw", max_per_class=3)
    samples = read_shard(shards / "train-00000.tar")
    assert {s.ext for s in samples} == {"npy"}
    bad = samples[1].image[:-3]
    with pytest.raises(ImageDecodeError, match=rf"{samples[1].key}.*truncated"):
        decode_stack([samples[0].image, bad], channels=1, names=[samples[0].key, samples[1].key])


# ---- batch-level streaming ---------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["cached", "cached-deferred", "online", "eval"])
def test_batches_equal_the_collated_per_sample_batches(tiny_pipeline: Path, kind: str, workers: int) -> None:
    kw = {"cached": {}, "cached-deferred": {"batch_augment": True}, "online": {"store_path": None},
          "eval": {"split": "test", "train": False, "store_path": None}}[kind]
    stream = ShardStream(spec(tiny_pipeline, **kw), epoch=3)
    # 24 does not divide the 32-sample shards: batches cross shard boundaries inside a worker
    got = batched(stream, 24, workers)
    assert_same_batches(got, collated(stream, 24, workers))
    assert sum(len(b["label"]) for b in got) == stream.num_samples()
    if kind == "cached":
        assert got[0]["teacher"].shape == (24, 10) and got[0]["params"].shape == (24, 0)


def test_raw_and_encoded_pipelines_train_the_same_teacher_and_cache(tiny_pipeline: Path,
                                                                    tiny_pipeline_raw: Path) -> None:
    """End to end through the stage commands: identical pixels give a byte-identical teacher (so
    every training batch was identical) and an identical stage-1 store."""
    raw, enc = Manifest.load(tiny_pipeline_raw / "manifest.json"), Manifest.load(tiny_pipeline / "manifest.json")
    assert (raw.image_format, enc.image_format) == ("raw", "png")
    a = load_file(str(tiny_pipeline_raw / "teacher.safetensors"))
    b = load_file(str(tiny_pipeline / "teacher.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = LogitStore.open(tiny_pipeline_raw / "store.zarr"), LogitStore.open(tiny_pipeline / "store.zarr")
    for name in ("logits", "params", "done"):
        np.testing.assert_array_equal(sa.group[name][:], sb.group[name][:], err_msg=name)
    stream_a = ShardStream(spec(tiny_pipeline_raw), epoch=2)
    assert_same_batches(batched(stream_a, 32, 0), batched(ShardStream(spec(tiny_pipeline), epoch=2), 32, 0))


@pytest.mark.parametrize("fmt", ["raw", "encoded"])
def test_the_writer_layout_fast_path_reads_what_the_general_path_reads(tmp_path: Path, fmt: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import shards

    m, shard_dir = _prepare(tmp_path, fmt, max_per_class=9, shard_size=16)
    paths = sorted(shard_dir.glob("*.tar"))
    fast = {p.name: read_shard(p) for p in paths}
    assert all(shards._writer_layout(d, shards.ustar_members(d, where="t"), 10) is not None
               for d in (p.read_bytes() for p in paths))
    monkeypatch.setattr(shards, "_writer_layout", lambda *a: None)
    assert {p.name: read_shard(p) for p in paths} == fast
    # labels outside the classes: the fast path steps aside and the general path names the sample
    monkeypatch.undo()
    with pytest.raises(DataError, match="outside the manifest's 2 classes"):
        read_shard(paths[0], num_classes=2)


def test_a_payload_that_looks_like_a_header_does_not_fool_the_vector_scan() -> None:
    """The header chain is found from every block holding the "ustar" magic; pixels that happen to
    hold it (at offset 257 of a block) break the chain, and the hop-by-hop scan reads the shard."""
    from pipeline.data import shards
    from pipeline.data.samples import Sample

    pixels = np.zeros((64, 16, 3), dtype=np.uint8)
    npy = bytearray(encode_npy(pixels))
    npy[512 + 257:512 + 262] = b"ustar"  # payloads start on a block: offset 257 of its 2nd block
    samples = [Sample(key=f"train_{i:07d}", index=i, label=i, image=bytes(npy), ext="npy") for i in range(3)]
    data = shards.shard_bytes(samples)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, 512)
    assert (rows[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1).sum() > 9  # 9 real headers
    assert shards._vector_chain(rows, len(data)) is None
    got = shards._fast_scan(data, shards.MAX_MEMBER_BYTES)
    assert got is not None and [n for n, _, _ in got][:3] == ["train_0000000.cls", "train_0000000.idx",
                                                             "train_0000000.npy"]
    read = shards._writer_layout(data, shards.ustar_members(data, where="t"), None)
    assert read is not None and [s.image for s in read] == [bytes(npy)] * 3
