"""pipeline.data sources end to end through prepare: digits, CIFAR pickles, ImageFolder trees."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DataError, Manifest, decode_image, prepare, read_shard, sha256_file
from pipeline.data.sources import digits_to_pixels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _run(tmp_path: Path, tag: str = "a", **params) -> tuple[Manifest, Path]:
    cfg = DataConfig.from_params({"name": "t", **params})
    shards = tmp_path / tag / "shards"
    m = prepare(cfg, shards_dir=shards, manifest_path=tmp_path / tag / "m.json", progress=False)
    assert Manifest.load(tmp_path / tag / "m.json") == m
    return m, shards


def _read_split(m: Manifest, shards: Path, split: str) -> list:
    info = m.splits[split]
    return [s for p, sh in zip(m.shard_paths(shards, split), info.shards, strict=True)
            for s in read_shard(p, expected_sha256=sh.sha256)]


# --- digits ----------------------------------------------------------------------------------

def test_digits_counts_stratification_and_pixels(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    m, shards = _run(tmp_path, shard_size=256)
    assert m.classes == tuple("0123456789") and m.channels == 1 and m.image_format == "png"
    assert (m.splits["train"].num_samples, m.splits["test"].num_samples) == (1347, 450)
    assert [s.count for s in m.splits["train"].shards] == [256] * 5 + [67]
    digits = load_digits()
    totals = Counter(digits.target.tolist())
    test = _read_split(m, shards, "test")
    for label, n in Counter(s.label for s in test).items():
        assert abs(n - 0.25 * totals[label]) <= 1  # stratified
    assert [s.key for s in test[:2]] == ["test_0000000", "test_0000001"]
    # Train + test is exactly the digits set, with pixel = round(v * 255 / 16).
    stored = sorted(decode_image(s.image, channels=1, name=s.key).numpy().tobytes() + bytes([s.label])
                    for s in _read_split(m, shards, "train") + test)
    expected = sorted(img.tobytes() + bytes([lab])
                      for img, lab in zip(digits_to_pixels(digits.images), digits.target, strict=True))
    assert stored == expected
    assert digits_to_pixels(np.array([0.0, 8.0, 16.0])).tolist() == [0, 128, 255]


def test_digits_rerun_is_byte_identical_with_and_without_workers(tmp_path: Path) -> None:
    m1, s1 = _run(tmp_path, "a", shard_size=300)
    m2, s2 = _run(tmp_path, "b", shard_size=300, workers=2)
    m3, _ = _run(tmp_path, "a", shard_size=300)  # same dirs again: idempotent
    assert m1.sha256 == m2.sha256 == m3.sha256
    assert (tmp_path / "a" / "m.json").read_bytes() == (tmp_path / "b" / "m.json").read_bytes()
    assert sorted(p.name for p in s1.iterdir()) == sorted(p.name for p in s2.iterdir())
    for p in s1.iterdir():
        assert p.read_bytes() == (s2 / p.name).read_bytes()


def test_digits_max_per_class_and_stale_shards_removed(tmp_path: Path) -> None:
    _run(tmp_path, shard_size=64)
    m, shards = _run(tmp_path, shard_size=16, max_per_class=3, test_fraction=0.5, split_seed=7)
    assert {k: v.num_samples for k, v in m.splits.items()} == {"train": 30, "test": 30}
    assert Counter(s.label for s in _read_split(m, shards, "train")) == {i: 3 for i in range(10)}
    assert sorted(p.name for p in shards.iterdir()) == [
        "test-00000.tar", "test-00001.tar", "train-00000.tar", "train-00001.tar"]
    assert m.source["split_seed"] == 7 and m.source["max_per_class"] == 3


# --- CIFAR pickles ---------------------------------------------------------------------------

def _write_cifar(root: Path, source: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """A release dir with the official keys, protocol-2 pickles and random uint8 rows."""
    rng = np.random.default_rng(0)
    ten = source == "cifar10"
    release = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    release.mkdir(parents=True)
    num, label_key = (10, "labels") if ten else (100, "fine_labels")
    names = {"label_names": [f"class{i}" for i in range(10)]} if ten else {
        "fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}
    (release / ("batches.meta" if ten else "meta")).write_bytes(pickle.dumps(names, protocol=2))
    files = ([f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]) + \
        (["test_batch"] if ten else ["test"])
    rows = {}
    for f in files:
        n = (n_test if "test" in f else n_train // (5 if ten else 1))
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num, n).tolist()
        batch = {"batch_label": f, "filenames": [f"{f}_{i}.png" for i in range(n)],
                 label_key: labels, "data": data}
        if not ten:
            batch["coarse_labels"] = [0] * n
        (release / f).write_bytes(pickle.dumps(batch, protocol=2))
        rows[f] = (data, labels)
    return rows


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_pickles_lossless_in_file_order(tmp_path: Path, source: str) -> None:
    rows = _write_cifar(tmp_path / "raw", source, n_train=300, n_test=120)
    m, shards = _run(tmp_path, source=source, root=str(tmp_path / "raw"), shard_size=128)
    train_files = [f for f in rows if "test" not in f]
    data = np.concatenate([rows[f][0] for f in train_files])
    labels = sum((rows[f][1] for f in train_files), [])
    got = _read_split(m, shards, "train")
    assert [s.label for s in got] == labels and [s.index for s in got] == list(range(300))
    for s, row in zip(got[::37], data[::37], strict=True):
        chw = decode_image(s.image, channels=3, name=s.key).numpy()
        assert np.array_equal(chw.reshape(-1), row)  # official rows are channel-planar CHW
    assert m.num_classes == (10 if source == "cifar10" else 100) and m.channels == 3
    release = next((tmp_path / "raw").iterdir())
    assert m.source["files_sha256"]["test" if source == "cifar100" else "test_batch"] == \
        sha256_file(release / ("test" if source == "cifar100" else "test_batch"))
    # root may also be the release dir itself; the content (and so the shards) is the same.
    m2, _ = _run(tmp_path, "b", source=source, root=str(release), shard_size=128)
    assert [s.sha256 for s in m2.splits["train"].shards] == [
        s.sha256 for s in m.splits["train"].shards]


def test_cifar_download_uses_torchvision_then_our_loader(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    def fake_cifar100(root: str, train: bool, download: bool) -> None:
        calls.append((root, download))
        _write_cifar(Path(root), "cifar100", n_train=20, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_cifar100)
    m, _ = _run(tmp_path, source="cifar100", root=str(tmp_path / "dl"), download=True)
    assert calls == [(str(tmp_path / "dl"), True)]
    assert m.splits["train"].num_samples == 20 and m.source["download"] is True


@pytest.mark.parametrize(("edit", "match"), [
    (lambda b: b.pop("data"), r"train: missing key\(s\) data"),
    (lambda b: b.update(data=b["data"][:, :100]), r"train: 'data' must be a uint8 array"),
    (lambda b: b.update(fine_labels=b["fine_labels"][:-1]), r"train: 'fine_labels' must be"),
    (lambda b: b.update(fine_labels=[100] * len(b["data"])), r"train: 'fine_labels' must be"),
])
def test_cifar_wrong_format_names_file(tmp_path: Path, edit, match: str) -> None:
    _write_cifar(tmp_path / "raw", "cifar100", n_train=10, n_test=10)
    path = tmp_path / "raw" / "cifar-100-python" / "train"
    batch = pickle.loads(path.read_bytes(), encoding="latin1")
    edit(batch)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=match):
        _run(tmp_path, source="cifar100", root=str(tmp_path / "raw"))


def test_cifar_missing_root_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no official python release at .*nowhere.*data\.root.*"
                                        r"data\.download: true"):
        _run(tmp_path, source="cifar10", root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not (DATA / "cifar-10-batches-py" / "batches.meta").exists(),
                    reason="shared/data official meta files absent")
@pytest.mark.parametrize(("source", "meta", "first", "last"), [
    ("cifar10", "cifar-10-batches-py/batches.meta", "airplane", "truck"),
    ("cifar100", "cifar-100-python/meta", "apple", "worm"),
])
def test_official_meta_files(tmp_path: Path, source: str, meta: str, first: str,
                             last: str) -> None:
    _write_cifar(tmp_path / "raw", source, n_train=10, n_test=5)
    shutil.copy(DATA / meta, tmp_path / "raw" / meta)
    m, _ = _run(tmp_path, source=source, root=str(tmp_path / "raw"))
    assert (m.classes[0], m.classes[-1]) == (first, last)


@pytest.mark.skipif(not (DATA / "cifar-100-python-partial" / "test").exists(),
                    reason="shared/data/cifar-100-python-partial absent")
def test_real_cifar100_partial(tmp_path: Path) -> None:
    m, shards = _run(tmp_path, source="cifar100", root=str(DATA / "cifar-100-python-partial"),
                     shard_size=512)
    assert {k: v.num_samples for k, v in m.splits.items()} == {"train": 486, "test": 916}
    assert m.classes[:3] == ("apple", "aquarium_fish", "baby") and m.num_classes == 100
    test = _read_split(m, shards, "test")
    assert [s.label for s in test[:5]] == [49, 33, 72, 51, 71]
    official = pickle.loads((DATA / "cifar-100-python-partial" / "test").read_bytes(),
                            encoding="latin1")["data"]
    assert np.array_equal(decode_image(test[-1].image, channels=3, name="t").numpy().reshape(-1),
                          official[-1])


# --- ImageFolder trees -----------------------------------------------------------------------

def _jpeg(seed: int, mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tree(root: Path, test_dir: str = "val") -> dict[str, bytes]:
    files = {}
    for split, per_class in (("train", 3), (test_dir, 2)):
        for c, cls in enumerate(["zebra", "ant", "cat"]):
            for i in range(per_class):
                files[f"{split}/{cls}/img{i}.jpg"] = _jpeg(100 * c + 10 * i + len(split),
                                                           "L" if i == 1 else "RGB")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return files


def test_imagefolder_dir_and_tar_give_identical_shards(tmp_path: Path) -> None:
    files = _tree(tmp_path / "tree")
    m, shards = _run(tmp_path, "dir", source="folder", root=str(tmp_path / "tree"), shard_size=4)
    assert m.classes == ("ant", "cat", "zebra") and m.image_format == "jpg"
    train = _read_split(m, shards, "train")
    # train is class-mixed (seeded by split_seed) so shards are not single-class; same images
    labels = [s.label for s in train]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and labels != sorted(labels)
    assert sorted(s.image for s in train if s.label == 0) == sorted(
        files[f"train/ant/img{i}.jpg"] for i in range(3))
    assert [s.label for s in _read_split(m, shards, "test")] == [0, 0, 1, 1, 2, 2]  # as listed
    assert m.splits["test"].num_samples == 6 and m.source["split_dirs"] == {"train": "train",
                                                                            "test": "val"}
    with tarfile.open(tmp_path / "tree.tar", "w") as tar:
        tar.add(tmp_path / "tree", arcname=".")  # members "./train/..." as `tar -C tree .` makes
    mt, _ = _run(tmp_path, "tar", source="imagenet", root=str(tmp_path / "tree.tar"), shard_size=4)
    for split in ("train", "test"):
        assert mt.splits[split].shards == m.splits[split].shards
    assert mt.source["layout"] == "tar" and mt.source["archives_sha256"]["tree.tar"] == \
        sha256_file(tmp_path / "tree.tar")


def test_imagefolder_test_dir_and_max_per_class(tmp_path: Path) -> None:
    _tree(tmp_path / "tree", test_dir="test")
    m, _ = _run(tmp_path, source="folder", root=str(tmp_path / "tree"), max_per_class=1)
    assert {k: v.num_samples for k, v in m.splits.items()} == {"train": 3, "test": 3}


@pytest.mark.parametrize(("setup", "match"), [
    (lambda r: (r / "train" / "dog").mkdir(), r"class folder train/dog/ holds no images"),
    (lambda r: shutil.rmtree(r / "train") or shutil.rmtree(r / "val") or (r / "x").mkdir(),
     r"no train/, val/ or test/ folder found \(found: x\)"),
    (lambda r: (r / "val" / "dog").mkdir() or (r / "val" / "dog" / "a.jpg").write_bytes(_jpeg(0)),
     r"val/ has classes missing from train/: dog"),
    (lambda r: shutil.rmtree(r / "train") or shutil.rmtree(r / "val") or (r / "train").mkdir(),
     r"no class folders under train/"),
])
def test_imagefolder_layout_errors(tmp_path: Path, setup, match: str) -> None:
    _tree(tmp_path / "tree")
    setup(tmp_path / "tree")
    with pytest.raises(DataError, match=match):
        _run(tmp_path, source="folder", root=str(tmp_path / "tree"))


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root .*nope does not exist"):
        _run(tmp_path, source="folder", root=str(tmp_path / "nope"))


@pytest.mark.skipif(not (DATA / "cifar10-images" / "test.tar").exists(),
                    reason="shared/data/cifar10-images absent")
def test_real_cifar10_jpeg_tars(tmp_path: Path) -> None:
    m, shards = _run(tmp_path, source="folder", root=str(DATA / "cifar10-images" / "test.tar"),
                     max_per_class=3, shard_size=8)
    assert list(m.splits) == ["test"] and m.splits["test"].num_samples == 30
    assert m.classes[0] == "airplane" and m.classes[-1] == "truck"
    test = _read_split(m, shards, "test")
    assert [s.label for s in test] == [c for c in range(10) for _ in range(3)]
    with tarfile.open(DATA / "cifar10-images" / "test.tar") as tar:
        assert test[3].image == tar.extractfile("test/automobile/0000.jpg").read()  # kept as-is
    # The directory holding train.tar and test.tar is one dataset with both splits.
    m2, _ = _run(tmp_path, "both", source="folder", root=str(DATA / "cifar10-images"),
                 max_per_class=1)
    assert {k: v.num_samples for k, v in m2.splits.items()} == {"train": 10, "test": 10}
    assert m2.source["layout"] == "tars"
