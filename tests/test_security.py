"""Hostile files, end to end through the `aekt` commands: nothing runs code, nothing escapes a path,
and each is refused with one clear paragraph (or, for odd but valid images, converted).

Unit-level checks of the same guards live in test_data_security.py, test_data_shards.py and
test_models.py; these tests feed crafted files to the commands a user runs. Payloads that would
run code create a marker file when unpickled: the tests assert it never appears (and, once, that
the payloads are live). docs/security.md lists what is trusted and how each case is handled.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import decode_image, read_shard
from pipeline.data.images import encode_png
from pipeline.data.manifest import canonical_sha256
from pipeline.models import build_model
from tests.pipeline_fixture import (
    COMMANDS,
    MANIFEST,
    STORE,
    aekt_inproc,
    copy_pipeline,
    snapshot,
    user_error,
    write_params,
)


class Payload:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution payload."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    """Three ways a pickle can create ``marker``: open(), os.system(), exec()."""
    return {"open": Payload(open, str(marker), "w"),
            "system": Payload(os.system, f"touch {marker}"),
            "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()")}


@pytest.fixture
def pipeline(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_pipeline(tmp_path_factory, tmp_path / "pipeline")


def refused(command: list[str], root: Path, *fragments: str) -> str:
    """Run ``command``; it must fail with one paragraph holding ``fragments`` and change no output."""
    before = snapshot(root)
    message = user_error(aekt_inproc(command, root))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert snapshot(root) == before
    return message


@pytest.mark.parametrize("kind", ["open", "system", "exec"])
def test_the_payloads_are_live(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(payloads(marker)[kind], protocol=2))
    assert marker.exists()


# ---- CIFAR pickles (`aekt prepare`, data.source: cifar100) -------------------------------------

def _cifar_release(root: Path, hostile_file: str, payload: Payload) -> Path:
    release = root / "cifar-100-python"
    release.mkdir()
    files = {"meta": {"fine_label_names": [f"c{i}" for i in range(100)]},
             "train": {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]},
             "test": {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1]}}
    files[hostile_file]["fine_label_names" if hostile_file == "meta" else "data"] = payload
    for name, content in files.items():
        (release / name).write_bytes(pickle.dumps(content, protocol=2))
    return release


@pytest.mark.parametrize(("hostile_file", "kind", "global_name"), [
    ("train", "open", "io.open"), ("meta", "system", "posix.system"), ("test", "exec", "__builtin__.exec"),
])
def test_cifar_pickle_payload_is_refused_and_never_runs(pipeline: Path, tmp_path: Path, hostile_file: str,
                                                        kind: str, global_name: str) -> None:
    marker = tmp_path / "pwned"
    release = _cifar_release(tmp_path, hostile_file, payloads(marker)[kind])
    write_params(pipeline, data={"source": "cifar100", "root": str(release)})
    refused(COMMANDS["prepare"], pipeline, f"refusing to unpickle {global_name} from "
            f"{release / hostile_file}", "not part of the official CIFAR format")
    assert not marker.exists()


# ---- teacher checkpoints (`aekt teacher` with teacher.checkpoint) ------------------------------

def _teacher_state() -> dict[str, torch.Tensor]:
    return build_model("digits_cnn", num_classes=10, in_channels=1).state_dict()


def _zip_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": _teacher_state(), "extra": payloads(marker)["open"]}, path)


def _legacy_checkpoint(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": payloads(marker)["system"]}, protocol=2))


def _pickle_named_safetensors(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(payloads(marker)["exec"], protocol=2))


def _huge_safetensors_header(path: Path, marker: Path) -> None:
    path.write_bytes(struct.pack("<Q", 1 << 40) + b'{"a": 1}')  # claims a 1 TB header


@pytest.mark.parametrize(("name", "craft", "fragment"), [
    ("teacher.pth", _zip_checkpoint, "Refusing to load"),
    ("teacher.pt", _legacy_checkpoint, "Refusing to load"),
    ("teacher.safetensors", _pickle_named_safetensors, "as a safetensors file"),
    ("big.safetensors", _huge_safetensors_header, "as a safetensors file"),
])
def test_malicious_teacher_checkpoint_is_refused(pipeline: Path, tmp_path: Path, name: str,
                                                 craft: Callable, fragment: str) -> None:
    marker, path = tmp_path / "pwned", tmp_path / name
    craft(path, marker)
    write_params(pipeline, teacher={"checkpoint": str(path)})
    refused(COMMANDS["teacher"], pipeline, str(path), fragment)
    assert not marker.exists()


# ---- resumable checkpoints (`aekt student --resume`) -------------------------------------------

def _rehash(ckpt: Path, files: dict[str, str] | None = None) -> None:
    """Rewrite state.json's checksums as an attacker would, so the tampering is not a torn file."""
    state = json.loads((ckpt / "state.json").read_text())
    state["files"] = files or {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
                               for name in state["files"]}
    (ckpt / "state.json").write_text(json.dumps(state))


def _crafted_optimizer(ckpt: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": payloads(marker)["open"]}, ckpt / "optimizer.pt")
    _rehash(ckpt)


def _pickle_as_model(ckpt: Path, marker: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(pickle.dumps(payloads(marker)["system"], protocol=2))
    _rehash(ckpt)


def _files_outside(ckpt: Path, marker: Path) -> None:
    outside = "../../../models/teacher.safetensors"
    _rehash(ckpt, {outside: hashlib.sha256((ckpt / outside).read_bytes()).hexdigest(),
                   "optimizer.pt": hashlib.sha256((ckpt / "optimizer.pt").read_bytes()).hexdigest()})
    older = ckpt.parent / "epoch-0001" / "model.safetensors"
    older.write_bytes(b"torn")


@pytest.mark.parametrize(("craft", "fragments"), [
    (_crafted_optimizer, ("runs/student/epoch-0002", "cannot restore", "names Python objects (io.open)",
                          "never executed", "run without --resume")),
    (_pickle_as_model, ("runs/student/epoch-0002", "cannot restore", "SafetensorError")),
    (_files_outside, ("runs/student", "every checkpoint is damaged", "run without --resume")),
], ids=["pickled-optimizer", "pickle-as-model", "state-names-files-outside"])
def test_crafted_resume_checkpoint_is_refused(pipeline: Path, tmp_path: Path, craft: Callable,
                                              fragments: tuple[str, ...]) -> None:
    marker = tmp_path / "pwned"
    craft(pipeline / "runs/student/epoch-0002", marker)
    refused([*COMMANDS["student"], "--resume"], pipeline, *fragments)
    assert not marker.exists()


# ---- shard members (`aekt evaluate` reads the test shards) -------------------------------------

def _member(name: str, data: bytes = b"", **fields: object) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


_OUTSIDE = f"/tmp/aekt-evil-{uuid.uuid4().hex[:8]}.png"
_MARKER = Path(f"/tmp/aekt-pwned-{uuid.uuid4().hex[:8]}")  # what the payloads in shards/stores create
_PICKLED = pickle.dumps(Payload(open, str(_MARKER), "w"), protocol=2)
SHARD_MEMBERS = [
    ("dotdot", _member("../evil.png", b"x"), "'..' escape"),
    ("absolute", _member(_OUTSIDE, b"x"), "absolute path"),
    ("symlink", _member("test_0000001.png", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "a symlink"),
    ("hardlink", _member("test_0000001.png", type=tarfile.LNKTYPE, linkname="test_0000000.png"),
     "a hard link"),
    ("char-device", _member("test_0000001.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
     "a character device"),
    ("block-device", _member("test_0000001.png", type=tarfile.BLKTYPE, devmajor=8), "a block device"),
    ("fifo", _member("test_0000001.png", type=tarfile.FIFOTYPE), "a fifo"),
    ("pax-header", _member("x", b"30 path=../../evil.png\n", type=tarfile.XHDTYPE),
     "a pax extended header"),
    ("declared-1GB", _member("test_0000001.png", size=1 << 30), "declares 1073741824 bytes, above the"),
    ("declared-past-end", _member("test_0000001.png", size=1 << 20), "the archive ends at byte"),
    ("pyd", _member("test_0000001.pyd", _PICKLED), "pickled payloads are never loaded"),
    ("pickle", _member("test_0000001.pickle", _PICKLED), "pickled payloads are never loaded"),
]


def _plant_shard(root: Path, evil: bytes) -> None:
    """Replace test-00000.tar by a tiny shard (one good sample + ``evil``) and re-sign the manifest,
    as someone handing over both files would."""
    png = encode_png(np.zeros((8, 8), np.uint8))
    good = _member("test_0000000.cls", b"0") + _member("test_0000000.idx", b"0") + \
        _member("test_0000000.png", png)
    data = good + evil + bytes(1024)
    (root / "data/shards/test-00000.tar").write_bytes(data)
    raw = json.loads((root / MANIFEST).read_text())
    raw["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    raw["sha256"] = canonical_sha256({k: v for k, v in raw.items() if k != "sha256"})
    (root / MANIFEST).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


@pytest.mark.parametrize(("evil", "fragment"), [m[1:] for m in SHARD_MEMBERS],
                         ids=[m[0] for m in SHARD_MEMBERS])
def test_hostile_shard_member_is_refused(pipeline: Path, tmp_path: Path, evil: bytes,
                                         fragment: str) -> None:
    _plant_shard(pipeline, evil)
    refused(COMMANDS["evaluate"], pipeline, "shard data/shards/test-00000.tar", fragment)
    assert not list(tmp_path.rglob("*evil*")) and not Path(_OUTSIDE).exists()
    assert not _MARKER.exists()


# ---- images (`aekt prepare`, data.source: folder) ----------------------------------------------

def _jpeg(mode: str, seed: int) -> bytes:
    bands = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, bands), dtype=np.uint8)
    buf = io.BytesIO()
    Image.frombytes(mode, (10, 12), pixels.tobytes()).save(buf, format="JPEG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def _bomb_png(side: int = 20000) -> bytes:
    """A valid 1-bit side x side PNG: ~50 KB on disk, 400 Mpixel decoded."""
    comp = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


HOSTILE_IMAGES = {
    "bomb.png": (_bomb_png, "refusing to decode a possible decompression bomb"),
    "truncated.jpg": (lambda: _jpeg("RGB", 9)[:200], "corrupt or truncated image"),
    "html.jpg": (lambda: b"<html><body>not an image</body></html>", "not a recognised image"),
    "ghostscript.jpg": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                        "not a recognised image"),
}
CONVERTED = {"gray.jpg": "L", "cmyk.jpg": "CMYK", "rgb.jpg": "RGB"}


def _image_tree(root: Path, hostile: list[str]) -> Path:
    tree = root / "tree"
    for i, (name, mode) in enumerate(CONVERTED.items()):
        for split in ("train", "val"):
            (tree / split / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            (tree / split / f"class{i % 2}" / name).write_bytes(_jpeg(mode, i))
    for name in hostile:
        (tree / "train" / "class0" / name).write_bytes(HOSTILE_IMAGES[name][0]())
    return tree


def _prepare_folder(root: Path, tree: Path, on_corrupt: str):
    root.mkdir(exist_ok=True)
    write_params(root, data={"source": "folder", "name": "hostile", "root": str(tree), "shard_size": 4,
                             "on_corrupt": on_corrupt, "format": "encoded"})  # JPEG bytes kept as given
    return aekt_inproc(["prepare", "--shards-dir", "shards", "--manifest", "manifest.json"], root)


@pytest.mark.parametrize("name", list(HOSTILE_IMAGES))
def test_hostile_image_fails_prepare_naming_it(tmp_path: Path, name: str) -> None:
    tree = _image_tree(tmp_path, [name])
    message = user_error(_prepare_folder(tmp_path / "work", tree, "fail"))
    assert f"train/class0/{name}: {HOSTILE_IMAGES[name][1]}" in message
    assert "data.on_corrupt: skip" in message
    assert not (tmp_path / "work" / "manifest.json").exists()


def test_hostile_images_skipped_and_grey_cmyk_converted(tmp_path: Path) -> None:
    tree = _image_tree(tmp_path, list(HOSTILE_IMAGES))
    result = _prepare_folder(tmp_path / "work", tree, "skip")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "work" / "manifest.json").read_text())
    skipped = manifest["splits"]["train"]["skipped"]
    assert sorted(skipped) == sorted(f"train/class0/{name}" for name in HOSTILE_IMAGES)
    stored = [s for p in sorted((tmp_path / "work" / "shards").glob("train-*.tar")) for s in read_shard(p)]
    sources = {(tree / "train" / f"class{i % 2}" / n).read_bytes(): n for i, n in enumerate(CONVERTED)}
    assert sorted(sources[s.image] for s in stored) == sorted(CONVERTED)  # JPEG bytes kept as given
    for sample in stored:
        pixels = decode_image(sample.image, channels=3, name=sources[sample.image])
        assert sample.ext == "jpg" and pixels.dtype == torch.uint8 and pixels.shape == (3, 12, 10)
        want = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(pixels.numpy(), want)


# ---- logit stores (`aekt student` opens the store) ---------------------------------------------

def _attrs(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(store: Path) -> None:
        meta = json.loads((store / "zarr.json").read_text())
        change(meta["attributes"])
        (store / "zarr.json").write_text(json.dumps(meta))
    return mutate


def _prov(**values: object) -> Callable[[Path], None]:
    return _attrs(lambda attrs: attrs["provenance"].update(values))


def _array_meta(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(store: Path) -> None:
        meta = json.loads((store / name / "zarr.json").read_text())
        change(meta)
        (store / name / "zarr.json").write_text(json.dumps(meta))
    return mutate


def _v2_pickle_logits(store: Path) -> None:
    """Re-declare the store as zarr v2 with an object array whose chunks are pickles."""
    meta = json.loads((store / "zarr.json").read_text())
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 2, "attributes": meta["attributes"]}))
    shutil.rmtree(store / "logits")
    (store / "logits").mkdir()
    (store / "logits" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [2, 300, 10], "chunks": [1, 16, 10], "dtype": "|O",
        "compressor": None, "fill_value": 0, "order": "C", "filters": [{"id": "pickle"}]}))
    (store / "logits" / "0.0.0").write_bytes(_PICKLED)


def _chunk(data: Callable[[Path], bytes]) -> Callable[[Path], None]:
    def mutate(store: Path) -> None:
        (store / "logits/c/0/3/0").write_bytes(data(store))
    return mutate


def _drop_views(attrs: dict) -> None:
    del attrs["provenance"]["views"]


STORE_CASES = [
    ("schema-version-string", _attrs(lambda a: a.update(schema_version="1")), "schema_version '1' is not 1"),
    ("provenance-a-list", _attrs(lambda a: a.update(provenance=[])), "no 'provenance' mapping"),
    ("provenance-lacks-views", _attrs(_drop_views), "provenance lacks views"),
    ("views-string", _prov(views="2"), "provenance.views should be int, got '2'"),
    ("views-bool", _prov(views=True), "provenance.views should be int, got True"),
    ("views-negative", _prov(views=-1), "provenance.views must be >= 1, got -1"),
    ("classes-zero", _prov(num_classes=0), "provenance.num_classes must be >= 1"),
    ("codec-unknown", _prov(codec="pickle"), "provenance codec 'pickle'"),
    ("codec-k-string", _prov(codec="topk", codec_params={"k": "20"}), "provenance codec 'topk'"),
    ("codec-extra-param", _prov(codec_params={"object_codec": "pickle"}), "provenance codec 'fp16'"),
    ("claims-1e12-samples", _prov(num_samples=10**12), "does not match the provenance's float16 (2, 10"),
    ("array-shape", _array_meta("logits", lambda m: m.update(shape=[2, 9999, 10])),
     "logits: float16 (2, 9999, 10) does not match the provenance's float16 (2, 300, 10)"),
    ("array-dtype", _array_meta("logits", lambda m: m.update(data_type="float64")),
     "logits: float64 (2, 300, 10) does not match"),
    ("chunks-misaligned", _array_meta("logits", lambda m: m["chunk_grid"]["configuration"].update(
        chunk_shape=[1, 8, 10])), "chunks (1, 8, 10) are not aligned to shard_size 16"),
    ("zarr-json-garbage", lambda s: (s / "zarr.json").write_text("{"), "cannot open the Zarr store"),
    ("v2-pickle-object-array", _v2_pickle_logits, "logits: unusable array metadata"),
    ("chunk-of-another-shape", _chunk(lambda s: (s / "params/c/0/3/0").read_bytes()),
     "cannot read chunk row (view 0, shard 3)"),
    ("chunk-garbage", _chunk(lambda s: b"garbage" * 7), "cannot read chunk row (view 0, shard 3)"),
]


@pytest.mark.parametrize(("mutate", "fragment"), [c[1:] for c in STORE_CASES],
                         ids=[c[0] for c in STORE_CASES])
def test_hostile_store_is_a_clear_error(pipeline: Path, mutate: Callable, fragment: str) -> None:
    mutate(pipeline / STORE)
    snapshot_dirs = ("data", "manifests", "models", "cache", "metrics", "plots")  # runs/: see test_errors
    before = snapshot(pipeline, snapshot_dirs)
    message = user_error(aekt_inproc(COMMANDS["student"], pipeline))
    assert STORE in message and fragment in message, message
    assert "aekt cache" in message  # the fix
    assert snapshot(pipeline, snapshot_dirs) == before
    assert not _MARKER.exists()
