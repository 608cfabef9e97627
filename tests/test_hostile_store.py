"""The logit store against hostile paths and damage, through the real `aekt` commands: nothing lost,
nothing silent.

- `aekt cache --rebuild --store X` deletes X only when X is a store `aekt cache` wrote; a mistyped
  path (models/, cache/, the repository, a folder of the user's) is refused and left byte for byte.
- A chunk file missing under a set done marker (zarr would read zeros) fails every reader, naming
  the store, view, shard and array; `aekt cache` rewrites the row.
- `aekt verify-cache` says which check failed, by how much and where; `--samples 0` is refused.
- A lock path that is a folder or a link is refused and left as it is.
- A full disk (ENOSPC) or a file-size limit (EFBIG) in `aekt inspect` / `aekt verify-cache` is one
  paragraph, and the previous outputs survive.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import augment
from pipeline.cache.codecs import make_codec
from pipeline.cache.store import CacheError, LogitStore
from tests.conftest import cli_env
from tests.pipeline_fixture import (
    COMMANDS,
    MANIFEST,
    STORE,
    aekt_inproc,
    assert_same_store,
    built_pipeline,
    copy_pipeline,
    sha256,
    snapshot,
    user_error,
    write_params,
)

CACHE = [a for a in COMMANDS["cache"] if a != "--rebuild"]
STORE_AT = CACHE.index("--store") + 1
INSPECT = ["inspect", STORE, "--manifest", MANIFEST, "--shards-dir", "data/shards", "--plots", "plots/inspect",
           "--json-out", "metrics/inspect.json"]
VERIFY = ["verify-cache", "--store", STORE, "--manifest", MANIFEST, "--shards-dir", "data/shards", "--teacher",
          "models/teacher.safetensors"]


@pytest.fixture
def pipeline(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_pipeline(tmp_path_factory, tmp_path / "pipeline")


def everything(base: Path) -> dict[str, object]:
    """Every path under ``base`` (lock files and folders too): mtime and sha256 of files, mtime of
    folders (a created or deleted entry changes it), target of links."""
    out: dict[str, object] = {}
    for path in sorted(base.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(base))] = ("link", os.readlink(path))
        elif path.is_dir():
            out[str(path.relative_to(base))] = ("dir", st.st_mtime_ns)
        else:
            out[str(path.relative_to(base))] = (st.st_mtime_ns, sha256(path))
    return out


def rebuild_into(store: str) -> list[str]:
    """`aekt cache ... --store STORE --rebuild`, as `dvc repro cache` runs it."""
    return [*CACHE[:STORE_AT], store, *CACHE[STORE_AT + 1:], "--rebuild"]


# ---- 1. `--rebuild` deletes only a store -------------------------------------------------------

def _git_repo(root: Path) -> str:
    subprocess.run(["git", "init", "-q", str(root)], check=True, timeout=30)
    (root / ".git" / "precious").write_text("history\n")
    return "."


def _git_repo_absolute(root: Path) -> str:
    _git_repo(root)
    return str(root)


def _user_folder(root: Path) -> str:
    (root / "notes" / "sub").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("mine\n")
    (root / "notes" / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return "notes"


def _store_with(rel: str) -> Callable[[Path], str]:
    """The real store plus one file of the user's, and inputs that force a rebuild."""
    def setup(root: Path) -> str:
        (root / STORE / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / STORE / rel).write_text("not zarr\n")
        write_params(root, augment={"seed": 1})  # provenance differs: the store would be rebuilt
        return STORE
    return setup


def _store_without_metadata(root: Path) -> str:
    (root / STORE / "zarr.json").unlink()
    return STORE


def _foreign_tmp_create(root: Path) -> str:
    folder = root / "cache" / ".digits-digits_cnn.zarr.tmp-create"  # where `create` builds the store
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's\n")
    write_params(root, augment={"seed": 1})
    return STORE


# (id, set-up returning the --store argument, fragments of the message)
REFUSALS = [
    ("models", lambda root: "models", ("models: not a logit store", "it has no zarr.json", "--store")),
    ("parent-of-the-store", lambda root: "cache", ("cache: not a logit store", "--store")),
    ("repo-dot", _git_repo, (". (", "a store needs a folder name of its own")),
    ("repo-absolute", _git_repo_absolute, ("not a logit store", "it has no zarr.json")),
    ("parent-of-the-repo", lambda root: "..", (".. (", "a store needs a folder name of its own")),
    ("user-folder", _user_folder, ("notes: not a logit store", "it has no zarr.json")),
    ("store-plus-user-file", _store_with("README.md"),
     (f"{STORE}: not a logit store", "it holds 'README.md'")),
    ("store-plus-user-file-in-an-array", _store_with("logits/c/mine.txt"),
     (f"{STORE}: not a logit store", "it holds 'logits/c/mine.txt'")),
    ("store-without-zarr-json", _store_without_metadata, (f"{STORE}: not a logit store", "no zarr.json")),
    ("user-folder-at-the-temporary-path", _foreign_tmp_create,
     (".digits-digits_cnn.zarr.tmp-create", "not a folder it left", "move it away")),
    ("a-file", lambda root: "models/teacher.json", ("'models/teacher.json' is a file",)),
]


@pytest.mark.parametrize(("setup", "fragments"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_rebuild_refuses_what_is_not_a_store_and_deletes_nothing(
        pipeline: Path, setup: Callable[[Path], str], fragments: tuple[str, ...]) -> None:
    store_arg = setup(pipeline)
    before = everything(pipeline.parent)
    message = user_error(aekt_inproc(rebuild_into(store_arg), pipeline))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert everything(pipeline.parent) == before


def test_rebuild_replaces_its_own_store_and_its_own_leftovers(pipeline: Path) -> None:
    store = pipeline / STORE
    # What killed creates leave beside the store: a half-made store, a replaced one half-deleted.
    for suffix in ("tmp-create", "tmp-old"):
        leftover = store.with_name(f".{store.name}.{suffix}")
        shutil.copytree(store / "logits", leftover / "logits")
        (leftover / "logits" / "c" / "0" / "0" / "0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"x")
    write_params(pipeline, augment={"seed": 1})
    before = snapshot(pipeline, ("data", "manifests", "models", "metrics", "plots", "runs"))
    result = aekt_inproc(COMMANDS["cache"], pipeline)
    assert result.exit_code == 0, result.output
    assert LogitStore.open(store).provenance.augment_seed == 1 and LogitStore.open(store).done_mask().all()
    assert sorted(p.name for p in store.parent.iterdir()) == [store.name, f"{store.name}.lock"]
    after = snapshot(pipeline, ("data", "manifests", "models", "metrics", "plots", "runs"))
    assert {k: v for k, v in after.items() if k != "metrics/cache.json"} == \
        {k: v for k, v in before.items() if k != "metrics/cache.json"}


def test_an_empty_folder_at_the_store_path_becomes_the_store(pipeline: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    shutil.rmtree(pipeline / STORE)
    (pipeline / STORE).mkdir()
    result = aekt_inproc(CACHE, pipeline)
    assert result.exit_code == 0, result.output
    assert_same_store(pipeline / STORE, built_pipeline(tmp_path_factory) / STORE)


# ---- 2. a missing chunk file is an error, never zeros -----------------------------------------

def _move_away(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.aside")
    path.rename(aside)
    return aside


@pytest.mark.parametrize("codec", ["fp16", "fp32", "int8", "topk"])
def test_missing_chunk_of_any_array_fails_inspect(pipeline: Path, codec: str) -> None:
    if codec != "fp16":  # the fixture's store is fp16: rebuild it with this codec
        write_params(pipeline, cache={"codec": codec, "topk": 3})
        assert aekt_inproc(COMMANDS["cache"], pipeline).exit_code == 0
    names = [*make_codec(codec, topk=3).fields(10), "params"]
    for name in names:
        chunk = pipeline / STORE / name / "c" / "1" / "3" / "0"
        aside = _move_away(chunk)
        before = snapshot(pipeline)
        message = user_error(aekt_inproc(INSPECT, pipeline))
        for fragment in (STORE, f"the chunk file {name}/c/1/3/0", f"'{name}' of view 1, shard 3",
                         "is missing", "would read as zeros", "rerun `aekt cache`", "delete the store"):
            assert fragment in message, f"{fragment!r} not in:\n{message}"
        assert snapshot(pipeline) == before
        aside.rename(chunk)
    assert aekt_inproc(INSPECT, pipeline).exit_code == 0


def test_missing_chunk_fails_student_and_verify_then_cache_rewrites_it(
        pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    (pipeline / STORE / "logits/c/1/3/0").unlink()
    (pipeline / STORE / "params/c/0/5/0").unlink()
    before = snapshot(pipeline)
    for command in (COMMANDS["student"], VERIFY):
        message = user_error(aekt_inproc(command, pipeline))
        assert f"{STORE}: the chunk file logits/c/1/3/0 ('logits' of view 1, shard 3) is missing (and 1 " \
               "more)" in message, message
        assert snapshot(pipeline) == before
    # The fix the message names: a plain rerun rewrites exactly those rows.
    result = aekt_inproc(CACHE, pipeline)
    assert result.exit_code == 0, result.output
    assert '"items_pending": 2' in (pipeline / "metrics/cache.json").read_text()
    assert_same_store(pipeline / STORE, built_pipeline(tmp_path_factory) / STORE)


def test_a_chunk_deleted_after_opening_fails_the_stage2_row_read(pipeline: Path) -> None:
    """The stage-2 stream reads through ``read_row`` from a store it opened earlier (no done_mask)."""
    store = LogitStore.open(pipeline / STORE)
    logits, params = store.read_row(0, 2)
    assert params.any()
    (pipeline / STORE / "params/c/0/2/0").unlink()
    with pytest.raises(CacheError, match=r"params/c/0/2/0 \('params' of view 0, shard 2\) is missing"):
        store.read_row(0, 2)


def test_store_that_skipped_an_all_zero_params_chunk_still_reads(tmp_path_factory: pytest.TempPathFactory,
                                                                   tmp_path: Path) -> None:
    """zarr < our write_empty_chunks setting skipped chunks equal to the fill value: a params row
    that is genuinely all zero has no file in stores written before. It reads as the zeros it is."""
    seed = next(s for s in range(1000)
                if not augment.sample_params("digits", seed=s, view=0, indices=np.array([16])).any())
    prov = LogitStore.open(built_pipeline(tmp_path_factory) / STORE).provenance
    prov = dataclasses.replace(prov, augment_seed=seed, views=1, num_samples=17)  # shard 1: 1 sample
    store = LogitStore.create(tmp_path / "old.zarr", prov)
    for shard in (0, 1):
        start, end = prov.shard_range(shard)
        params = augment.sample_params("digits", seed=seed, view=0, indices=np.arange(start, end))
        logits = np.linspace(-1, 1, (end - start) * 10, dtype=np.float32).reshape(end - start, 10)
        zarr.open_array(str(store.path / "logits"), mode="r+")[0, start:end] = logits.astype(np.float16)
        zarr.open_array(str(store.path / "params"), mode="r+")[0, start:end] = params  # old writer
        store.mark_done(0, shard)
    assert not (store.path / "params/c/0/1/0").exists()
    reopened = LogitStore.open(store.path)
    assert reopened.done_mask().all()
    assert not reopened.read_row(0, 1)[1].any()
    # Our writer now writes every chunk, also an all-zero one.
    reopened = LogitStore.open(store.path, mode="r+")
    reopened.write_row(0, 1, {"logits": np.zeros((1, 10), np.float16)}, np.zeros((1, 2), np.float32))
    assert (store.path / "logits/c/0/1/0").is_file() and (store.path / "params/c/0/1/0").is_file()


# ---- 3. verify-cache explains a failure -------------------------------------------------------

def test_verify_cache_names_the_failed_check_the_numbers_and_where(pipeline: Path) -> None:
    zarr.open_array(str(pipeline / STORE / "logits"), mode="r+")[1, 32:48, 3] = 9.0  # view 1, shard 2
    params = zarr.open_array(str(pipeline / STORE / "params"), mode="r+")
    row = params[0, 0:16]
    row[5, 0] = 7.0
    params[0, 0:16] = row
    before = snapshot(pipeline)
    message = user_error(aekt_inproc([*VERIFY, "--samples", "400"], pipeline))
    for fragment in (f"{STORE}: verification failed", "stored augmentation params differ",
                     "view 0, sample index 5 'train_0000005': stored [7.0,", "KL(fresh teacher || cached) at "
                     "tau=1 reaches", "above the fp16 tolerance 0.0001", "worst: view 1, sample index",
                     "max |dlogit|", "delete it and rerun `aekt cache`"):
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert snapshot(pipeline) == before


@pytest.mark.parametrize(("option", "fragment"), [
    (["--samples", "0"], "Invalid value for '--samples': 0 is not in the range x>=1"),
    (["--samples", "-5"], "Invalid value for '--samples'"),
    (["--tolerance", "nan"], "Invalid value for '--tolerance': nan is not a number"),
    (["--tolerance", "-1"], "Invalid value for '--tolerance'"),
])
def test_verify_cache_rejects_bad_options(pipeline: Path, option: list[str], fragment: str) -> None:
    result = aekt_inproc([*VERIFY, *option], pipeline)
    assert result.exit_code == 2 and fragment in user_error(result)


# ---- 4. the lock path --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["folder", "link"])
def test_lock_path_that_is_not_a_file_is_refused_and_kept(pipeline: Path, kind: str) -> None:
    lock = pipeline / f"{STORE}.lock"
    lock.unlink()
    if kind == "folder":
        lock.mkdir()
        (lock / "inside.txt").write_text("mine\n")
    else:  # `open(lock, "w")` would have truncated the link's target
        lock.symlink_to(pipeline / "models" / "teacher.json")
    before = everything(pipeline)
    message = user_error(aekt_inproc(CACHE, pipeline))
    assert f"{STORE}.lock: is a {'folder' if kind == 'folder' else 'symbolic link'}" in message
    assert "move it away" in message and "rerun `aekt cache`" in message
    assert everything(pipeline) == before


# ---- 5. disk full in inspect and verify-cache --------------------------------------------------

def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


def test_inspect_on_a_full_disk_is_one_paragraph_and_keeps_the_old_report(pipeline: Path) -> None:
    assert aekt_inproc(INSPECT, pipeline).exit_code == 0
    before = snapshot(pipeline)
    limit = 4096  # the CSV fits, a PNG does not: EFBIG part way through the set

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(["aekt", *INSPECT], cwd=pipeline, env=cli_env(), preexec_fn=small_files,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.split("Error: ", 1)[1].strip()
    assert "\n" not in message, message
    assert message.startswith("plots/inspect/") and "writing failed — File too large [errno 27]" in message
    assert "rerun `aekt inspect`" in message
    assert snapshot(pipeline) == before and not _temp_files(pipeline)


def test_verify_cache_report_to_a_full_disk_is_one_paragraph(pipeline: Path) -> None:
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        proc = subprocess.run(["aekt", *VERIFY, "--json"], cwd=pipeline, env=cli_env(), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.split("Error: ", 1)[1].strip()
    assert "\n" not in message, message
    assert message.startswith("standard output: writing failed — No space left on device [errno 28]")
    assert "rerun `aekt verify-cache`" in message



# ---- free space, checked before stage 1 starts -------------------------------------------------

def test_the_store_size_estimate_matches_a_real_store(pipeline: Path) -> None:
    from pipeline.cache.build import store_bytes_estimate

    store = LogitStore.open(pipeline / STORE)
    on_disk = sum(store.disk_bytes().values())
    assert 0.7 * on_disk < store_bytes_estimate(store.provenance) < 1.5 * on_disk


def test_too_little_free_space_refuses_before_any_work(pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operating system's free-space answer is the only thing replaced: a real full disk cannot
    be made on demand here, and the check must run before the lock, the teacher and any row."""
    import shutil

    from pipeline.cache import build

    shutil.rmtree(pipeline / STORE)
    before = snapshot(pipeline)
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    message = user_error(aekt_inproc(COMMANDS["cache"], pipeline))
    assert STORE in message and "GB free" in message and "augment.views" in message, message
    assert not (pipeline / STORE).exists() and snapshot(pipeline) == before
