"""Hostile data files (issue 18, "nothing lost, nothing silent"): each is a real crafted file that
used to lose data silently, hang, or crash with a traceback, and now ends `aekt prepare`,
`teacher` or `evaluate` with one paragraph naming the file and the fix, leaving the outputs that
existed before untouched.

- ImageFolder .tar sources: a flipped header bit or a cut at a member boundary made tarfile stop
  early and whole classes vanish (3 of 10 in the real CIFAR-10 test tar); a split missing classes
  was only a warning.
- A FIFO named *.jpg in an ImageFolder directory blocked `aekt prepare` forever.
- A shard label outside the manifest's classes (shard re-signed in the manifest) crashed training
  and evaluation with a traceback.
- A full disk during `aekt prepare` (RLIMIT_FSIZE stands in: writes fail with EFBIG, as ENOSPC).
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import Manifest, read_shard, write_shard
from pipeline.data.manifest import canonical_sha256
from pipeline.data.samples import Sample
from tests.conftest import SHARED_DATA
from tests.pipeline_fixture import aekt_inproc, snapshot, start, user_error, write_params

REAL_TAR = SHARED_DATA / "cifar10-images" / "test.tar"
needs_real_tar = pytest.mark.skipif(not REAL_TAR.is_file(), reason=f"{REAL_TAR} is not present")
PREPARE = ["prepare", "--shards-dir", "data/shards", "--manifest", "manifests/hostile.json"]
TIMEOUT_S = 60  # a hang fails the test instead of blocking the suite


def folder_params(root: Path, source: Path, **data: object) -> None:
    write_params(root, data={"source": "folder", "root": str(source), "name": "hostile",
                             "max_per_class": None, "shard_size": 4, "on_corrupt": "fail", "format": "encoded",
                             **data})


def png(seed: int, side: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def synthetic_members(classes: tuple[str, ...] = ("ant", "bee", "cat"),
                      test_classes: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """train/<class>/i.png (3 each) and test/<class>/i.png (2 each) of random pixels."""
    members = {}
    for split, per_class, names in (("train", 3, classes), ("test", 2, test_classes or classes)):
        for c, cls in enumerate(names):
            for i in range(per_class):
                members[f"{split}/{cls}/{i}.png"] = png(100 * c + 10 * i + len(split))
    return members


def offset_of(tar_path: Path, name: str) -> int:
    with tarfile.open(tar_path) as tar:
        return tar.getmember(name).offset


def flip_header_bit(name: str) -> Callable[[Path], bytes]:
    def damage(path: Path) -> bytes:
        data, at = bytearray(path.read_bytes()), offset_of(path, name)
        data[at + 3] ^= 0x04  # one bit of the member's name: its checksum no longer matches
        return bytes(data)
    return damage


def cut_before(name: str) -> Callable[[Path], bytes]:
    return lambda path: path.read_bytes()[:offset_of(path, name)]  # a cut at a member boundary


def error_paragraph(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> str:
    """The one-paragraph message of a real `aekt` process that failed cleanly."""
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    message = stderr.split("Error: ", 1)[1].strip()
    assert message and "\n" not in message, f"not one paragraph:\n{message}"
    return message


def run_aekt(args: list[str], cwd: Path, *, fsize_limit: int | None = None) -> tuple[int, str]:
    """Run `aekt ARGS` as a real process, bounded by TIMEOUT_S; (exit status, stderr)."""
    def limit() -> None:  # Python ignores SIGXFSZ, so a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    # Its own process group: on a hang, its worker processes (which hold stderr open) die too.
    proc = start(args, cwd, preexec_fn=limit if fsize_limit is not None else None,
                 start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        pytest.fail(f"`aekt {' '.join(args)}` still running after {TIMEOUT_S} s: it hangs")
    return proc.returncode, stderr


# ---- 1. ImageFolder .tar sources: nothing dropped silently ---------------------------------

SYNTHETIC_DAMAGE = {
    "flipped header bit": (flip_header_bit("train/bee/1.png"),
                           r"corrupt tar header at byte {bee1}, after member 'train/bee/0\.png': "
                           r"bad checksum; every member from there on would be missing"),
    "cut at a member boundary": (cut_before("train/bee/1.png"),
                                 r"truncated tar: the archive ends at byte {bee1}, after member "
                                 r"'train/bee/0\.png', without the end-of-archive marker"),
    "cut inside the end marker": (lambda p: p.read_bytes()[:offset_of(p, "test/cat/1.png") + 1024],
                                  r"truncated tar: .*after member 'test/cat/1\.png'"),
    "two archives concatenated": (lambda p: p.read_bytes() * 2,
                                  r"data after the end-of-archive marker at byte \d+"),
    "header zeroed": (lambda p: (lambda d, at: d[:at] + bytes(512) + d[at + 512:])(
        p.read_bytes(), offset_of(p, "train/bee/1.png")),
        r"corrupt tar header at byte {bee1}, .*zero block followed by data"),
}


@pytest.mark.parametrize("damage", list(SYNTHETIC_DAMAGE))
def test_damaged_imagefolder_tar_fails_and_keeps_outputs(tmp_path: Path, damage: str) -> None:
    archive = tmp_path / "tree.tar"
    write_tar(archive, synthetic_members())
    folder_params(tmp_path, archive)
    assert aekt_inproc(PREPARE, tmp_path).exit_code == 0
    before = snapshot(tmp_path)
    bee1 = offset_of(archive, "train/bee/1.png")
    mutate, pattern = SYNTHETIC_DAMAGE[damage]
    archive.write_bytes(mutate(archive))
    message = user_error(aekt_inproc(PREPARE, tmp_path))
    assert message.startswith(f"{archive}: "), message
    assert re.search(pattern.format(bee1=bee1), message), message
    assert "rerun `aekt prepare`" in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("setup", "match"), [
    (lambda: synthetic_members(test_classes=("ant", "bee")),
     "1 of 3 classes have images in train/ but no test/ folder: cat; the test split is incomplete"),
    (lambda: synthetic_members(test_classes=("ant", "bee", "cat", "dog")),
     "test/ has classes missing from train/: dog"),
], ids=["class-missing-from-test", "class-missing-from-train"])
def test_split_missing_a_class_fails(tmp_path: Path, setup, match: str) -> None:
    write_tar(tmp_path / "tree.tar", setup())
    folder_params(tmp_path, tmp_path / "tree.tar")
    message = user_error(aekt_inproc(PREPARE, tmp_path))
    assert message.startswith(f"{tmp_path / 'tree.tar'}: ") and match in message, message
    assert not (tmp_path / "manifests" / "hostile.json").exists()


def test_class_with_zero_images_fails(tmp_path: Path) -> None:
    write_tar(tmp_path / "tree.tar", synthetic_members(), dirs=("test/dog/", "train/dog/"))
    folder_params(tmp_path, tmp_path / "tree.tar")
    message = user_error(aekt_inproc(PREPARE, tmp_path))
    assert "class folder test/dog/ holds no images" in message or \
        "class folder train/dog/ holds no images" in message, message


@needs_real_tar
@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_real_cifar10_tar_damaged_at_frog_loses_nothing_silently(tmp_path: Path,
                                                                 damage: str) -> None:
    """The reported case: the real test.tar damaged at the first frog image used to give a
    dataset of 6 classes (frog, horse, ship, truck gone; only a WARNING)."""
    copy = tmp_path / "test.tar"
    copy.write_bytes(REAL_TAR.read_bytes())
    mutate = flip_header_bit if damage == "flip" else cut_before
    frog = offset_of(copy, "test/frog/0000.jpg")
    copy.write_bytes(mutate("test/frog/0000.jpg")(copy))
    folder_params(tmp_path, copy, max_per_class=2)
    message = user_error(aekt_inproc(PREPARE, tmp_path))
    what = "corrupt tar header" if damage == "flip" else "truncated tar: the archive ends"
    assert message.startswith(f"{copy}: {what} at byte {frog}, after member 'test/frog'"), message
    assert not (tmp_path / "manifests" / "hostile.json").exists()


@needs_real_tar
def test_real_cifar10_members_split_missing_a_class(tmp_path: Path) -> None:
    """An ImageFolder tar of real CIFAR-10 JPEGs whose test/ lacks one class fails; whole, it
    prepares (the same member bytes, so the check is about the layout, not the images)."""
    with tarfile.open(REAL_TAR) as tar:
        real = {cls: [tar.extractfile(f"test/{cls}/{i:04d}.jpg").read() for i in range(5)]
                for cls in ("bird", "cat", "dog")}
    whole = {f"{split}/{cls}/{i}.jpg": images[i + offset] for cls, images in real.items()
             for split, offset, n in (("train", 0, 3), ("test", 3, 2)) for i in range(n)}
    write_tar(tmp_path / "real.tar", whole)
    folder_params(tmp_path, tmp_path / "real.tar")
    assert aekt_inproc(PREPARE, tmp_path).exit_code == 0
    manifest = Manifest.load(tmp_path / "manifests" / "hostile.json")
    assert manifest.classes == ("bird", "cat", "dog") and manifest.splits["test"].num_samples == 6
    before = snapshot(tmp_path)
    write_tar(tmp_path / "real.tar", {k: v for k, v in whole.items() if not k.startswith("test/dog")})
    message = user_error(aekt_inproc(PREPARE, tmp_path))
    assert "1 of 3 classes have images in train/ but no test/ folder: dog" in message, message
    assert snapshot(tmp_path) == before


# ---- 2. special files in an ImageFolder directory: never opened ----------------------------

def fifo_tree(root: Path) -> Path:
    tree = root / "tree"
    for name, data in synthetic_members().items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    os.mkfifo(tree / "train" / "bee" / "pipe.jpg")  # nothing ever writes to it
    return tree


def test_fifo_named_jpg_fails_without_hanging(tmp_path: Path) -> None:
    folder_params(tmp_path, fifo_tree(tmp_path))
    status, stderr = run_aekt(PREPARE, tmp_path)
    message = error_paragraph(subprocess.CompletedProcess([], status), stderr)
    assert message.startswith(f"{tmp_path / 'tree/train/bee/pipe.jpg'}: is a FIFO (named pipe), "
                              "not a regular file"), message
    assert "set params.yaml data.on_corrupt: skip" in message
    assert not (tmp_path / "manifests" / "hostile.json").exists()
    assert not list((tmp_path / "data").rglob("*.tar"))


def test_special_files_skipped_and_listed_with_on_corrupt_skip(tmp_path: Path) -> None:
    tree = fifo_tree(tmp_path)
    (tree / "train" / "ant" / "link.jpg").symlink_to(tree / "train" / "bee" / "pipe.jpg")
    skipped = ["train/ant/link.jpg", "train/bee/pipe.jpg"]
    sock_path = tree / "test" / "cat" / "s.jpg"
    if len(str(sock_path)) < 100:  # AF_UNIX path limit
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(sock_path))
        skipped.append("test/cat/s.jpg")
    folder_params(tmp_path, tree, on_corrupt="skip", workers=2)  # opened in worker processes
    status, stderr = run_aekt(PREPARE, tmp_path)
    assert status == 0, stderr[-3000:]
    manifest = Manifest.load(tmp_path / "manifests" / "hostile.json")
    listed = [*manifest.splits["train"].skipped, *manifest.splits["test"].skipped]
    assert sorted(listed) == sorted(skipped)
    assert manifest.splits["train"].num_samples == 9 and manifest.splits["test"].num_samples == 6


# ---- 3. shard labels outside the manifest's classes ----------------------------------------

def resign_with_label(root: Path, shard: str, label: int) -> str:
    """Give the first sample of ``shard`` another label, and re-sign the shard in the manifest
    (its sha256, then the manifest's own): only the label check can catch it. Returns its key."""
    path = root / "data" / "shards" / shard
    samples = read_shard(path)
    first = samples[0]
    samples[0] = Sample(key=first.key, index=first.index, label=label, image=first.image,
                        ext=first.ext)
    sha = write_shard(path, samples)
    manifest_path = root / "manifests" / "digits.json"
    raw = json.loads(manifest_path.read_text())
    split = raw["splits"][shard.split("-")[0]]
    next(s for s in split["shards"] if s["name"] == shard)["sha256"] = sha
    raw.pop("sha256")
    raw["sha256"] = canonical_sha256(raw)
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return first.key


def test_label_outside_classes_is_a_clear_error(tmp_path: Path) -> None:
    write_params(tmp_path, data={"max_per_class": 6, "shard_size": 16}, teacher={"epochs": 1, "batch_size": 16})
    manifest = ["--manifest", "manifests/digits.json", "--shards-dir", "data/shards"]
    teacher = ["teacher", *manifest, "--out", "models/teacher.safetensors", "--metrics",
               "metrics/teacher.json", "--history", "plots/teacher.csv", "--no-progress"]
    evaluate = ["evaluate", "--model", "models/teacher.safetensors", *manifest, "--metrics",
                "metrics/eval.json", "--plots", "plots/eval"]
    for args in (["prepare", *manifest[:2], *manifest[2:]], teacher):
        result = aekt_inproc(args, tmp_path)
        assert result.exit_code == 0, result.output
    test_key = resign_with_label(tmp_path, "test-00000.tar", 10)
    train_key = resign_with_label(tmp_path, "train-00001.tar", 99)
    before = snapshot(tmp_path)
    for args, shard, key, label in ((evaluate, "test-00000.tar", test_key, 10),
                                    (teacher, "train-00001.tar", train_key, 99)):
        message = user_error(aekt_inproc(args, tmp_path))
        assert message == (
            f"shard data/shards/{shard}: sample {key!r} has label {label}, outside the manifest's "
            "10 classes (valid labels 0..9); the shard does not belong to this dataset; rerun "
            "`aekt prepare` (or `dvc repro prepare`) to rebuild the shards."), message
    assert snapshot(tmp_path) == before


# ---- 4. a full disk during prepare ---------------------------------------------------------

def disk_tree(root: Path, *, train: int, test_side: int) -> Path:
    """train: ``train`` tiny images per class; test: 2 per class of side ``test_side``."""
    tree = root / "tree"
    for split, per_class, side in (("train", train, 4), ("test", 2, test_side)):
        for c, cls in enumerate(("ant", "bee")):
            (tree / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (tree / split / cls / f"{i}.png").write_bytes(png(1000 * c + i, side))
    return tree


@pytest.mark.parametrize(("train", "shard_size", "test_side", "limit_kib", "written"), [
    # Train shards (20 KiB) fit the limit; the first test shard (4 noisy 64x64 PNGs, 70 KiB)
    # does not: the staged train shards must go, the old shards stay.
    (11, 4, 64, 24, "data/shards/test-00000.tar"),
    # 70 one-sample shards (10 KiB each) fit; the manifest listing them (15 KiB) does not.
    (33, 1, 4, 12, "manifests/hostile.json"),
], ids=["shard", "manifest"])
def test_disk_full_in_prepare_keeps_existing_outputs(tmp_path: Path, train: int, shard_size: int,
                                                     test_side: int, limit_kib: int,
                                                     written: str) -> None:
    tree = disk_tree(tmp_path, train=train, test_side=test_side)
    folder_params(tmp_path, tree, shard_size=2)  # every new shard differs from these
    assert aekt_inproc(PREPARE, tmp_path).exit_code == 0  # the previous, complete outputs
    (tmp_path / "data" / "shards" / "notes.txt").write_text("not ours")
    before = snapshot(tmp_path)
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    folder_params(tmp_path, tree, shard_size=shard_size)
    status, stderr = run_aekt(PREPARE, tmp_path, fsize_limit=limit_kib * 1024)
    message = error_paragraph(subprocess.CompletedProcess([], status), stderr)
    assert message.startswith(f"{written}: cannot write it: File too large [errno 27]; the disk "
                              "is full"), message
    assert "rerun `aekt prepare`; the existing shards and manifest are unchanged." in message
    assert snapshot(tmp_path) == before
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing  # no leftovers
    # With room again the same command succeeds and replaces the outputs.
    assert aekt_inproc(PREPARE, tmp_path).exit_code == 0
    assert Manifest.load(tmp_path / "manifests" / "hostile.json").shard_size == shard_size
    assert (tmp_path / "data" / "shards" / "notes.txt").read_text() == "not ours"
