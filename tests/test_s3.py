"""Object storage through a real S3 API (moto on loopback, s3fs): shards and the logit store at
``s3://`` URLs give bitwise the outputs of a local run, stage 1 survives kill -9 on S3, a corrupt
shard object names its URL, the object-store create/lease protocol, and no secret is written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.errors import CacheError
from pipeline.data import DataError, Manifest
from tests.conftest import cli_env
from tests.pipeline_fixture import (
    COMMANDS,
    MANIFEST,
    STORE,
    aekt_inproc,
    assert_same_store,
    built_pipeline,
    user_error,
    write_params,
)
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET, s3_objects

_DRIVER = """
import json, sys
from stages.cli import main
for args in json.loads(sys.argv[1]):
    main.main(args, prog_name="aekt", standalone_mode=False)
"""


def _on_s3(args: list[str], shards: str, store: str) -> list[str]:
    """A stage command of the reference build with its shards and store moved to URLs."""
    swap = {"data/shards": shards, STORE: store}
    return [swap.get(a, a) for a in args]


def _run_stages(root: Path, steps: list[list[str]], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(steps)], cwd=root, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_pipeline(tmp_path_factory)


def _s3_pipeline(tmp_path: Path, bucket: str) -> tuple[Path, str, str]:
    root = tmp_path / "pipeline"
    root.mkdir()
    write_params(root)
    shards, store = f"{bucket}/shards/digits", f"{bucket}/cache/digits-digits_cnn.zarr"
    return root, shards, store


def test_digits_pipeline_on_s3_is_bitwise_the_local_run(reference: Path, tmp_path: Path,
                                                         bucket: str, s3_env: str) -> None:
    root, shards, store = _s3_pipeline(tmp_path, bucket)
    steps = [_on_s3(COMMANDS[s], shards, store) for s in ("prepare", "teacher", "cache", "student", "evaluate")]
    proc = _run_stages(root, steps)

    assert (root / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    local_shards = {p.name: p.read_bytes() for p in (reference / "data/shards").glob("*.tar")}
    assert s3_objects(shards) == local_shards
    remote_store = s3_objects(store)
    local_store = {str(p.relative_to(reference / STORE)): p.read_bytes()
                   for p in (reference / STORE).rglob("*") if p.is_file()}
    assert remote_store == local_store  # every chunk and metadata object, byte for byte
    assert s3_objects(f"{bucket}/cache").keys() == {f"digits-digits_cnn.zarr/{k}" for k in local_store}, \
        "the lease object is deleted when stage 1 ends"
    for name in ("models/teacher.safetensors", "models/student.safetensors", "models/student-head.safetensors"):
        assert _weights(root / name) == _weights(reference / name), name
    for name in ("metrics/eval.json", "metrics/student.json"):
        got, want = (json.loads((d / name).read_text()) for d in (root, reference))
        drop = {"seconds", "train_seconds", "images_per_second"}
        assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in want.items() if k not in drop}

    # Nothing secret or machine-specific is written: not into the store, the manifest, the outputs
    # nor the logs.
    written = b"".join([*remote_store.values(), proc.stdout.encode(), proc.stderr.encode()] +
                       [p.read_bytes() for p in root.rglob("*") if p.is_file()])
    for secret in (FAKE_KEY_ID, FAKE_SECRET, s3_env, s3_env.split("//")[1]):
        assert secret.encode() not in written, f"{secret!r} was written"


def test_stage1_killed_on_s3_then_rerun_gives_the_same_store(reference: Path, tmp_path: Path,
                                                              bucket: str) -> None:
    root, shards, store = _s3_pipeline(tmp_path, bucket)
    _upload(reference / "data/shards", shards)
    for name in (MANIFEST, "models/teacher.safetensors", "models/teacher.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes((reference / name).read_bytes())
    cache = _on_s3(COMMANDS["cache"], shards, store)
    env = {**cli_env(), "AEKT_LEASE_SECONDS": "600"}  # the rerun must not wait for the lease to expire
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *cache], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, done = time.monotonic() + 120, 0
    while proc.poll() is None and time.monotonic() < deadline:
        done = _count(f"{store}/done/c")
        if done >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill ({done} rows):\n{proc.stderr.read()}"
    assert 3 <= done < 38
    assert any(k.endswith(".zarr.lock") for k in s3_objects(f"{bucket}/cache")), "the killed run left its lease"

    _run_stages(root, [cache])  # a plain rerun: takes over the dead run's lease, redoes unfinished rows
    _download(store, tmp_path / "store.zarr")
    assert_same_store(tmp_path / "store.zarr", reference / STORE)


def _weights(path: Path) -> tuple[dict, dict]:
    """(metadata, tensor bytes) of a safetensors file: its header's key order is not fixed, the values are."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118


def _count(url: str) -> int:
    """How many objects are under ``url`` (a fresh listing)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    try:
        return len(fs.find(url.removeprefix("s3://")))
    except FileNotFoundError:
        return 0


def _exists(url: str) -> bool:
    import s3fs

    return s3fs.S3FileSystem().exists(url.removeprefix("s3://"))


def _download(url: str, dest: Path) -> None:
    for key, data in s3_objects(url).items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(data)


def _upload(src: Path, url: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(src.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{url.removeprefix('s3://')}/{path.relative_to(src)}", path.read_bytes())


def test_a_corrupt_shard_object_fails_with_its_url(reference: Path, tmp_path: Path, bucket: str) -> None:
    shards = f"{bucket}/shards/digits"
    _upload(reference / "data/shards", shards)
    manifest = Manifest.load(reference / MANIFEST)
    assert manifest.read_shard(shards, "test", 1) == manifest.read_shard(reference / "data/shards", "test", 1)
    damaged = bytearray((reference / "data/shards/test-00001.tar").read_bytes())
    damaged[2000] ^= 0xFF
    import s3fs

    s3fs.S3FileSystem().pipe_file(f"{shards.removeprefix('s3://')}/test-00001.tar", bytes(damaged))
    with pytest.raises(DataError, match=f"shard {shards}/test-00001.tar: sha256 .* does not match"):
        manifest.read_shard(shards, "test", 1)
    result = aekt_inproc(["evaluate", "--model", "models/student.safetensors", "--manifest", MANIFEST,
                          "--shards-dir", shards, "--metrics", str(tmp_path / "eval.json"), "--plots",
                          str(tmp_path / "plots")], reference)
    message = user_error(result)
    assert f"{shards}/test-00001.tar" in message and "does not match the manifest" in message


def test_a_missing_shard_object_or_bucket_is_one_paragraph(reference: Path, bucket: str) -> None:
    manifest = Manifest.load(reference / MANIFEST)
    with pytest.raises(DataError, match=f"shard {bucket}/nothing-here/train-00000.tar: cannot read"):
        manifest.read_shard(f"{bucket}/nothing-here", "train", 0)
    with pytest.raises(DataError, match="shard s3://aekt-no-such-bucket/x/train-00000.tar: cannot read"):
        manifest.read_shard("s3://aekt-no-such-bucket/x", "train", 0)


# ---- the object-store protocol -----------------------------------------------------------------------

def test_a_killed_create_is_no_store_and_a_plain_rerun_creates_it(reference: Path, tmp_path: Path,
                                                                  bucket: str) -> None:
    from pipeline.cache.store import LogitStore
    from pipeline.cache.writer import open_or_create
    from pipeline.config import CacheConfig

    store = f"{bucket}/cache/s.zarr"
    _upload(reference / STORE, store)
    prov = LogitStore.open(store).provenance
    import s3fs

    fs = s3fs.S3FileSystem()
    # What a kill between zarr's bare group metadata and our attrs leaves: arrays, no provenance.
    fs.pipe_file(f"{store.removeprefix('s3://')}/zarr.json",
                 json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())
    with pytest.raises(CacheError, match="schema_version None"):
        LogitStore.open(store)
    fresh = open_or_create(store, prov, CacheConfig(), rebuild=False)  # no --rebuild needed
    assert not fresh.marked_rows().any() and fresh.provenance == prov
    assert set(s3_objects(store)) == {"zarr.json", *(f"{a}/zarr.json" for a in ("logits", "params", "labels", "done"))}


def test_foreign_objects_under_the_store_prefix_are_refused_and_kept(reference: Path, bucket: str) -> None:
    from pipeline.cache.store import LogitStore

    store = f"{bucket}/cache/s.zarr"
    _upload(reference / STORE, store)
    prov = LogitStore.open(store).provenance
    import s3fs

    s3fs.S3FileSystem().pipe_file(f"{store.removeprefix('s3://')}/notes.txt", b"mine")
    before = s3_objects(store)
    with pytest.raises(CacheError, match=f"{store}: not a logit store written by `aekt cache` "
                                         "\\(it holds 'notes.txt'"):
        LogitStore.create(store, prov)
    assert s3_objects(store) == before


def test_the_lease_refuses_a_second_writer_and_is_taken_over_when_stale(bucket: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cache import writer

    store = f"{bucket}/cache/s.zarr"
    with writer.store_lock(store):
        assert _exists(f"{store}.lock")
        with pytest.raises(CacheError, match=f"{store}: another `aekt cache` is writing this store \\(lease "
                                             f"{store}.lock is held by"), writer.store_lock(store):
            pass
    assert not _exists(f"{store}.lock"), "released on exit"

    import s3fs

    fs = s3fs.S3FileSystem()
    for doc in ({"owner": "x", "host": "elsewhere", "pid": 1, "expires": time.time() - 1},  # expired
                {"owner": "x", "host": __import__("socket").gethostname(), "pid": 2 ** 22 + 7,
                 "expires": time.time() + 600}):  # this host, a process that is gone
        fs.pipe_file(f"{store.removeprefix('s3://')}.lock", json.dumps(doc).encode())
        with writer.store_lock(store):
            assert json.loads(fs.cat_file(f"{store.removeprefix('s3://')}.lock"))["owner"] != "x"

    live = {"owner": "x", "host": "elsewhere", "pid": 1, "expires": time.time() + 600}
    fs.pipe_file(f"{store.removeprefix('s3://')}.lock", json.dumps(live).encode())
    with pytest.raises(CacheError, match="held by elsewhere pid 1"), writer.store_lock(store):
        pass


def test_a_lease_taken_over_while_held_stops_the_run(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cache import writer

    monkeypatch.setattr(writer, "LEASE_SECONDS", 0.3)
    store = f"{bucket}/cache/s.zarr"
    import s3fs

    fs = s3fs.S3FileSystem()
    with pytest.raises(CacheError, match="another run took over this store's lease"), writer.store_lock(store):
        fs.pipe_file(f"{store.removeprefix('s3://')}.lock", json.dumps({"owner": "thief"}).encode())
        time.sleep(0.5)
    assert json.loads(fs.cat_file(f"{store.removeprefix('s3://')}.lock"))["owner"] == "thief", "not deleted"


# ---- shard URLs through webdataset's opener ---------------------------------------------------------

def test_every_url_form_reads_the_same_samples(reference: Path, bucket: str) -> None:
    import functools
    import http.server
    import threading

    local = reference / "data/shards"
    _upload(local, f"{bucket}/shards")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = Manifest.load(reference / MANIFEST)
        want = manifest.read_shard(local, "train", 2)
        for loc in (str(local), f"file://{local}", f"{bucket}/shards", f"pipe:cat {local}/{{name}}",
                    f"http://127.0.0.1:{server.server_address[1]}"):
            got = manifest.read_shard(loc, "train", 2)
            assert [(s.key, s.index, s.label, s.image) for s in got] == \
                [(s.key, s.index, s.label, s.image) for s in want], loc
        with pytest.raises(DataError, match="a pipe: shards location is a command with \\{name\\}"):
            manifest.read_shard(f"pipe:cat {local}/train-00002.tar", "train", 2)
        with pytest.raises(DataError, match="shard pipe:false .*cannot read"):
            manifest.read_shard("pipe:false {name}", "train", 2)
    finally:
        server.shutdown()
    assert np.array_equal([s.index for s in want], np.arange(want[0].index, want[0].index + len(want)))


def test_prepare_refuses_what_it_cannot_write(tmp_path: Path, bucket: str) -> None:
    write_params(tmp_path, data={"max_per_class": 2, "shard_size": 8})
    cases = {("--shards-dir", "s3://aekt-no-such-bucket/shards"): "s3://aekt-no-such-bucket/shards/train-00000.tar: "
             "cannot write this shard",
             ("--shards-dir", "pipe:cat {name}"): "writes shards to a local folder or an object store",
             ("--manifest", f"{bucket}/m.json"): "the manifest is a local file committed to git"}
    for (option, value), expected in cases.items():
        args = {"--shards-dir": "shards", "--manifest": "m.json", option: value}
        message = user_error(aekt_inproc(["prepare", *[x for kv in args.items() for x in kv]], tmp_path))
        assert expected in message, message
    assert not (tmp_path / "m.json").exists()
