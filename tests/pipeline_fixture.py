"""One small digits pipeline, built once per test session and copied per test, plus helpers that
run the real `aekt` commands and fingerprint what they leave on disk.

The pipeline is built by the real stage commands in one subprocess with OMP_NUM_THREADS=1, so its
store is the uninterrupted reference the kill/resume tests compare against. Tests that only need a
command to fail fast run it in-process through click (`aekt_inproc`): same command object, same
error handling, without paying for a fresh interpreter (torch import) on two shared cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner, Result

from stages.cli import main as aekt_main
from tests.conftest import REPO, cli_env

# Small enough to build in seconds: 30 per class -> 300 train samples in 19 shards of 16.
OVERRIDES = {"data": {"max_per_class": 30, "shard_size": 16}, "teacher": {"epochs": 2},
             "augment": {"views": 2}, "train": {"epochs": 2, "checkpoint_every": 1}}
STORE = "cache/digits-digits_cnn.zarr"
MANIFEST = "manifests/digits.json"
# The stage commands as dvc.yaml runs them (paths relative to the pipeline folder).
COMMANDS = {
    "prepare": ["prepare", "--shards-dir", "data/shards", "--manifest", MANIFEST],
    "teacher": ["teacher", "--manifest", MANIFEST, "--shards-dir", "data/shards", "--out",
                "models/teacher.safetensors", "--metrics", "metrics/teacher.json", "--history",
                "plots/teacher.csv", "--no-progress"],
    "cache": ["cache", "--manifest", MANIFEST, "--shards-dir", "data/shards", "--teacher",
              "models/teacher.safetensors", "--store", STORE, "--rebuild", "--summary",
              "metrics/cache.json", "--no-progress"],
    "student": ["student", "--manifest", MANIFEST, "--shards-dir", "data/shards", "--teacher",
                "models/teacher.safetensors", "--store", STORE, "--out", "models/student.safetensors",
                "--metrics", "metrics/student.json", "--history", "plots/train.csv", "--checkpoints",
                "runs/student", "--no-progress"],
    "evaluate": ["evaluate", "--model", "models/student.safetensors", "--manifest", MANIFEST,
                 "--shards-dir", "data/shards", "--metrics", "metrics/eval.json", "--plots", "plots/eval"],
}
OUTPUT_DIRS = ("data", "manifests", "models", "cache", "metrics", "plots", "runs")

# Runs each command list through the real click group in one interpreter (one torch import).
_DRIVER = """
import json, sys
from stages.cli import main
for args in json.loads(sys.argv[1]):
    main.main(args, prog_name="aekt", standalone_mode=False)
"""

_BUILT: dict[str, Path] = {}


def write_params(root: Path, **sections: dict) -> None:
    """Update ``root``/params.yaml with ``sections`` (first write: the repository's + OVERRIDES)."""
    path = root / "params.yaml"
    if path.exists():
        params, layers = yaml.safe_load(path.read_text()), (sections,)
    else:
        params, layers = yaml.safe_load((REPO / "params.yaml").read_text()), (OVERRIDES, sections)
    for layer in layers:
        for name, values in layer.items():
            params.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def built_pipeline(factory: pytest.TempPathFactory) -> Path:
    """The pipeline folder with every stage's outputs, built on first use in this session."""
    if "root" not in _BUILT:
        root = factory.mktemp("built") / "pipeline"
        root.mkdir()
        write_params(root)
        steps = [COMMANDS[s] for s in ("prepare", "teacher", "cache", "student", "evaluate")]
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(steps)], cwd=root,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"building the test pipeline failed:\n{proc.stderr[-4000:]}"
        _BUILT["root"] = root
    return _BUILT["root"]


def copy_pipeline(factory: pytest.TempPathFactory, dest: Path) -> Path:
    """A private copy of the built pipeline (mtimes preserved) at ``dest``, for one test to damage."""
    shutil.copytree(built_pipeline(factory), dest)
    return dest


# ---- running commands ------------------------------------------------------------------------

@contextmanager
def _inside(cwd: Path) -> Iterator[None]:
    old, handlers, threads = os.getcwd(), logging.root.handlers[:], torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the reference build: same float results
    try:
        yield
    finally:
        os.chdir(old)
        logging.root.handlers[:] = handlers
        torch.set_num_threads(threads)


def aekt_inproc(args: list[str], cwd: Path) -> Result:
    """Run `aekt ARGS` in this process from ``cwd`` (click's own error handling and exit codes)."""
    with _inside(cwd):
        return CliRunner().invoke(aekt_main, args, prog_name="aekt")


def start(args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    """Start `aekt ARGS` as a real process (console script, OMP_NUM_THREADS=1)."""
    return subprocess.Popen(["aekt", *args], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def user_error(result: Result) -> str:
    """The one-paragraph message of a command that failed cleanly (no traceback), else fail."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), (
        f"crashed instead of a clean error: {result.exception!r}\n{result.output}")
    assert "Traceback" not in result.output, result.output
    assert "Error: " in result.output, result.output
    message = result.output.split("Error: ", 1)[1].strip()
    assert message and "\n\n" not in message, f"not one paragraph:\n{message}"
    return message


# ---- comparing files and stores --------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path, dirs: tuple[str, ...] = OUTPUT_DIRS) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under ``dirs`` (existing outputs).

    ``<store>.lock`` is left out: every `aekt cache` opens it, which is its whole point.
    """
    out = {}
    for name in dirs:
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix != ".lock":
                out[str(path.relative_to(root))] = (path.stat().st_mtime_ns, sha256(path))
    return out


def store_contents(path: Path) -> dict[str, object]:
    """Every array of a logit store as numpy, plus its attrs (for exact comparisons)."""
    group = zarr.open_group(str(path), mode="r")
    out: dict[str, object] = {name: arr[...] for name, arr in group.arrays()}
    out["attrs"] = json.loads(json.dumps(dict(group.attrs)))
    return out


def assert_same_store(actual: Path, expected: Path) -> None:
    got, want = store_contents(actual), store_contents(expected)
    assert sorted(got) == sorted(want)
    assert got["attrs"] == want["attrs"]
    for name in want:
        if name != "attrs":
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{actual}/{name}")


def done_markers(store: Path) -> int:
    """How many (view, shard) done-marker chunk files exist (0 if the store is not there yet)."""
    folder = store / "done" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
