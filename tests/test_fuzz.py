"""Randomised hostile inputs across the trust boundary (issue 18): shard tars, manifests, store
metadata and params files are mutated by hypothesis, and the command that reads each must end in a
clean result or one clear paragraph — never a traceback, never a hang (SIGALRM bounds each run).

Bounded for the default suite: a fixed number of examples per target, derandomised (the same
examples every run, so CI is repeatable); `AEKT_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py` digs deeper.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.manifest import canonical_sha256
from tests.pipeline_fixture import COMMANDS, MANIFEST, STORE, aekt_inproc, copy_pipeline, user_error

EXAMPLES = int(os.environ.get("AEKT_FUZZ_EXAMPLES", "30"))
SECONDS_PER_RUN = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
CACHE = [a for a in COMMANDS["cache"] if a != "--rebuild"]

# A mutation: up to four (relative offset, xor mask) byte flips, then an optional cut (fraction kept).
FLIPS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=0, max_size=4)
CUT = st.one_of(st.none(), st.floats(0, 1, exclude_max=True))


def mutate_bytes(data: bytes, flips: list[tuple[float, int]], cut: float | None) -> bytes:
    out = bytearray(data)
    for where, mask in flips:
        if out:
            out[int(where * len(out))] ^= mask
    return bytes(out[: int(cut * len(out))] if cut is not None else out)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_pipeline(tmp_path_factory, tmp_path_factory.mktemp("fuzz") / "pipeline")


@contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Each example damages files of the shared copy; put them back afterwards."""
    saved = {p: p.read_bytes() for p in paths}
    try:
        yield
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def _alarm(signum: int, frame: object) -> None:
    raise TimeoutError(f"a fuzzed command ran past {SECONDS_PER_RUN} s (a hang)")


def clean_outcome(args: list[str], root: Path) -> None:
    """Exit 0, or one clear paragraph (user_error asserts: no traceback, exit != 0, one paragraph)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_RUN)
    try:
        result = aekt_inproc(args, root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not isinstance(result.exception, TimeoutError), result.exception
    if result.exit_code != 0:
        user_error(result)


def resign_shard(root: Path, shard: Path) -> None:
    """Update the manifest as a hostile publisher would: the damaged shard's sha256, then the manifest's."""
    path = root / MANIFEST
    raw = json.loads(path.read_text())
    for split in raw["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == shard.name:
                entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    raw["sha256"] = canonical_sha256({k: v for k, v in raw.items() if k != "sha256"})
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


@FUZZ
@given(flips=FLIPS, cut=CUT, resign=st.booleans(), shard=st.integers(0, 3))
def test_fuzzed_test_shards_give_a_result_or_a_clear_error(pipeline: Path, flips, cut, resign: bool,
                                                           shard: int) -> None:
    target = sorted((pipeline / "data/shards").glob("test-*.tar"))[shard]
    with restored(target, pipeline / MANIFEST):
        target.write_bytes(mutate_bytes(target.read_bytes(), flips, cut))
        if resign:
            resign_shard(pipeline, target)
        clean_outcome(COMMANDS["evaluate"], pipeline)


@FUZZ
@given(flips=FLIPS, cut=CUT, resign=st.booleans())
def test_fuzzed_manifests_give_a_result_or_a_clear_error(pipeline: Path, flips, cut, resign: bool) -> None:
    path = pipeline / MANIFEST
    with restored(path):
        path.write_bytes(mutate_bytes(path.read_bytes(), flips, cut))
        if resign:
            try:
                raw = json.loads(path.read_text())
                raw["sha256"] = canonical_sha256({k: v for k, v in raw.items() if k != "sha256"})
                path.write_text(json.dumps(raw))
            except (ValueError, TypeError, AttributeError):
                pass  # not JSON (or not an object) any more: the reader must say so
        clean_outcome(COMMANDS["evaluate"], pipeline)


@FUZZ
@given(flips=FLIPS, cut=CUT, which=st.sampled_from(["zarr.json", "logits/zarr.json", "params/zarr.json",
                                                     "done/zarr.json"]))
def test_fuzzed_store_metadata_gives_a_result_or_a_clear_error(pipeline: Path, flips, cut, which: str) -> None:
    path = pipeline / STORE / which
    with restored(path):
        path.write_bytes(mutate_bytes(path.read_bytes(), flips, cut))
        clean_outcome(["inspect", STORE, "--manifest", MANIFEST, "--shards-dir", "data/shards",
                       "--plots", "fuzz-plots"], pipeline)


@FUZZ
@given(flips=FLIPS, cut=CUT)
def test_fuzzed_params_files_give_a_result_or_a_clear_error(pipeline: Path, flips, cut) -> None:
    path = pipeline / "params.yaml"
    with restored(path):
        path.write_bytes(mutate_bytes(path.read_bytes(), flips, cut))
        clean_outcome(["preset-args", "params.yaml"], pipeline)  # builds and validates every section
        clean_outcome(CACHE, pipeline)  # and a stage that acts on them
