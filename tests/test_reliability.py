"""Failure modes as tested behaviour, with real processes and real files: stage 1 killed at random
points, stage 2 killed and resumed past a torn checkpoint, two writers on one store, a write error.

Every store is compared array by array with the uninterrupted one the session fixture built (both
with OMP_NUM_THREADS=1, so the teacher's float results are identical).
"""

from __future__ import annotations

import csv
import json
import logging
import random
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cache.store import CacheError, LogitStore
from tests.pipeline_fixture import (
    COMMANDS,
    STORE,
    aekt_inproc,
    assert_same_store,
    built_pipeline,
    copy_pipeline,
    done_markers,
    snapshot,
    start,
    user_error,
    write_params,
)

# What a user reruns by hand: no --rebuild, so resuming must not depend on it.
CACHE = [a for a in COMMANDS["cache"] if a != "--rebuild"]
ITEMS = 2 * 19  # views x train shards of the fixture


@pytest.fixture
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_pipeline(tmp_path_factory)


@pytest.fixture
def pipeline(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_pipeline(tmp_path_factory, tmp_path / "pipeline")


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 180) -> int:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; its exit code."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            time.sleep(delay)
            proc.kill()
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    return proc.returncode


def _readable_markers(store: Path) -> int:
    try:
        return int(LogitStore.open(store).done_mask().sum())
    except CacheError:  # killed before the store existed
        return 0


@dataclass
class _KilledRun:
    seed: int
    root: Path
    ready: Callable[[], bool]
    delay: float
    proc: subprocess.Popen
    kill_at: float | None = None


def _start_killable(seed: int, root: Path) -> _KilledRun:
    rng = random.Random(seed)
    store = root / STORE
    shutil.rmtree(store)
    # Seed 0 kills while the store is being created; seeds 1-4 once k rows are done, k drawn from
    # successive quarters of the first 28 of 38 rows; a random delay then lands the kill anywhere in
    # the next rows (mid-chunk, between a chunk and its marker, ...).
    k = 0 if seed == 0 else rng.randrange(1 + 7 * (seed - 1), 1 + 7 * seed)
    creating = store.with_name(f".{store.name}.tmp-create")
    ready = creating.exists if k == 0 else lambda: done_markers(store) >= k
    return _KilledRun(seed, root, ready, rng.uniform(0, 0.03), start(CACHE, root))


def test_cache_killed_at_random_points_then_rerun_equals_uninterrupted(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, reference: Path) -> None:
    # Five seeds run side by side (each in its own copy) to share the interpreter start-up time.
    runs = [_start_killable(seed, copy_pipeline(tmp_path_factory, tmp_path / f"seed{seed}"))
            for seed in range(5)]
    deadline = time.monotonic() + 180
    while any(run.proc.poll() is None for run in runs) and time.monotonic() < deadline:
        now = time.monotonic()
        for run in runs:
            if run.proc.poll() is None and run.kill_at is None and run.ready():
                run.kill_at = now + run.delay
            if run.proc.poll() is None and run.kill_at is not None and now >= run.kill_at:
                run.proc.kill()
        time.sleep(0.002)
    for run in runs:
        run.proc.communicate(timeout=60)
        assert run.proc.returncode == -signal.SIGKILL, f"seed {run.seed} finished before the kill"
    for run in runs:
        store = run.root / STORE
        kept = _readable_markers(store)
        assert kept < ITEMS
        result = aekt_inproc(CACHE, run.root)  # the dead process's lock file must not block
        assert result.exit_code == 0, f"seed {run.seed}: {result.output}"
        summary = json.loads((run.root / "metrics/cache.json").read_text())
        assert summary["items_pending"] == ITEMS - kept, f"seed {run.seed}"  # done rows skipped
        assert_same_store(store, reference / STORE)
        assert not list(store.parent.glob(".*tmp-create"))


def test_student_killed_then_resumed_past_a_torn_checkpoint(pipeline: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    write_params(pipeline, train={"epochs": 6, "checkpoint_every": 1})
    ckpts = pipeline / "runs/student"
    shutil.rmtree(ckpts)
    finals = snapshot(pipeline, ("models", "metrics"))

    def two_checkpoints() -> bool:
        latest = ckpts / "latest.json"
        try:
            return json.loads(latest.read_text())["epoch"] >= 2
        except (OSError, ValueError):
            return False

    proc = start(COMMANDS["student"], pipeline)
    assert _kill_when(proc, two_checkpoints, 0.0) == -signal.SIGKILL, "finished before the kill"
    assert snapshot(pipeline, ("models", "metrics")) == finals  # the killed run exported nothing
    *_, previous, newest = sorted(ckpts.glob("epoch-*"))
    torn = newest / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    with caplog.at_level(logging.INFO):
        result = aekt_inproc([*COMMANDS["student"], "--resume"], pipeline)
    assert result.exit_code == 0, result.output
    assert f"{newest.name} is not usable (model.safetensors checksum mismatch)" in caplog.text
    assert f"resumed from runs/student/{previous.name}" in caplog.text
    metrics = json.loads((pipeline / "metrics/student.json").read_text())
    assert metrics["epochs"] == 6
    with (pipeline / "plots/train.csv").open() as f:
        assert [int(float(row["epoch"])) for row in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_second_cache_run_on_the_same_store_refuses(pipeline: Path, reference: Path) -> None:
    store = pipeline / STORE
    shutil.rmtree(store)
    first = start(CACHE, pipeline)
    # The store appears (renamed into place) only while the first run holds the lock: freeze it there.
    deadline = time.monotonic() + 180
    while not store.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before the second could start"
        before = snapshot(pipeline, (STORE,))
        message = user_error(aekt_inproc(CACHE, pipeline))
        assert f"{STORE}: another `aekt cache` is writing this store" in message
        assert f"{STORE}.lock" in message and "resumes" in message
        assert snapshot(pipeline, (STORE,)) == before
    finally:
        first.send_signal(signal.SIGCONT)
    first.communicate(timeout=180)
    assert first.returncode == 0
    assert_same_store(store, reference / STORE)


def test_write_error_leaves_no_done_marker_and_a_rerun_completes(pipeline: Path,
                                                                 reference: Path) -> None:
    store = pipeline / STORE
    for name in ("logits", "params", "done"):  # as if view 1 was never written
        shutil.rmtree(store / name / "c" / "1")
    view0 = snapshot(pipeline, (STORE,))
    # A per-file size limit below every logits chunk: each chunk write fails with EFBIG, as on a
    # full disk (CPython ignores SIGXFSZ, so the write raises instead of killing the process).
    limit = min(p.stat().st_size for p in (reference / STORE / "logits" / "c").rglob("*")
                if p.is_file()) - 1

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start(CACHE, pipeline, preexec_fn=small_files)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert "Traceback" not in err and "\n\n" not in err.split("Error: ", 1)[1].strip()
    assert f"Error: {STORE}: writing view 1, shard 0 failed: [Errno 27] File too large" in err
    assert "rerun `aekt cache`" in err and "no done marker" in err
    done = LogitStore.open(store).done_mask()
    assert done[0].all() and not done[1].any()  # no marker for any failed row
    assert {k: v for k, v in snapshot(pipeline, (STORE,)).items() if k in view0} == view0

    result = aekt_inproc(CACHE, pipeline)
    assert result.exit_code == 0, result.output
    assert json.loads((pipeline / "metrics/cache.json").read_text())["items_pending"] == 19
    assert_same_store(store, reference / STORE)
