"""Shared fixtures: the repository root, the real data folder, and a helper to run the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The S3 fixtures (moto on loopback), for every test module that asks for them.
from tests.s3_server import bucket, s3_env, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def cli_env() -> dict[str, str]:
    """Environment whose PATH finds this interpreter's `aekt`, `dvc` and `torchrun`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for torchrun's rendezvous in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


TINY_PARAMS = """
data: {source: digits, name: tiny, shard_size: 32, max_per_class: 20}
augment: {recipe: digits, seed: 0, views: 2}
teacher: {arch: digits_cnn, epochs: 3, batch_size: 32, lr: 0.05, lr_schedule: cosine}
cache: {codec: fp32, batch_size: 64}
student: {arch: digits_mlp}
loss: {name: aekt, warmup_epochs: 1}
train: {epochs: 3, batch_size: 32, lr: 0.05}
eval: {batch_size: 128}
"""


def build_tiny(root: Path, params: str) -> Path:
    """prepare, teacher and cache of ``params`` in ``root``, through the stage commands."""
    (root / "params.yaml").write_text(params)
    aekt = [sys.executable, "-m", "stages.cli"]
    run([*aekt, "prepare", "--shards-dir", "shards", "--manifest", "manifest.json"], root)
    run([*aekt, "teacher", "--manifest", "manifest.json", "--shards-dir", "shards", "--out",
         "teacher.safetensors", "--metrics", "teacher-metrics.json", "--history", "teacher.csv",
         "--no-progress"], root)
    run([*aekt, "cache", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher",
         "teacher.safetensors", "--store", "store.zarr", "--no-progress"], root)
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real digits pipeline, small: 200 train samples in 7 shards, a 3-epoch teacher, a 2-view
    fp32 store. Built once per session through the stage commands; tests copy what they modify."""
    return build_tiny(tmp_path_factory.mktemp("tiny"), TINY_PARAMS)


@pytest.fixture(scope="session")
def tiny_pipeline_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_pipeline`` with raw-pixel shards (data.format: raw), built the same way."""
    return build_tiny(tmp_path_factory.mktemp("tiny-raw"),
                      TINY_PARAMS.replace("data: {", "data: {format: raw, "))


@pytest.fixture(params=["encoded", "raw"])
def tiny_any(request: pytest.FixtureRequest) -> Path:
    """Each tiny pipeline in turn: tests of replay, resume and equality run on both shard formats."""
    return request.getfixturevalue("tiny_pipeline" if request.param == "encoded" else "tiny_pipeline_raw")
