"""The launch checks: a world Accelerate does not see, or `accelerate launch` starting one process
where several were asked for, is an error, not N duplicate runs or one silent lone run. The launches
are real: 2 CPU processes on gloo, 127.0.0.1 only, each bounded by a timeout."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.distributed import (
    LaunchError,
    check_single_launch,
    check_world,
    input_mismatches,
    make_accelerator,
    requested_processes,
)
from tests.conftest import cli_env
from tests.test_cache import store_arrays

STUDENT = ["student", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher", "teacher.safetensors",
           "--store", "store.zarr", "--out", "out/student.safetensors", "--metrics", "out/metrics.json",
           "--history", "out/train.csv", "--checkpoints", "out/ckpt", "--no-progress"]
CACHE = ["cache", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher", "teacher.safetensors",
         "--store", "new.zarr", "--summary", "summary.json", "--no-progress"]


def test_a_world_mismatch_is_refused_with_the_launch_command() -> None:
    with pytest.raises(LaunchError, match="torchrun --nproc_per_node N"):
        check_world(1, 2, "NO")
    check_world(2, 2, "MULTI_CPU")


def test_inputs_that_differ_between_ranks_are_named_with_their_ranks_and_hosts() -> None:
    same = {"teacher_sha256": "ab" * 32, "views": "8"}
    assert input_mismatches([("a", same), ("b", dict(same))]) == []
    lines = input_mismatches([("a", same), ("b", same | {"views": "4"}), ("c", {"views": "8"})])
    assert lines == [f"teacher_sha256: {'ab' * 12}… on rank 0 (a), 1 (b); (missing) on rank 2 (c)",
                     "views: 8 on rank 0 (a), 2 (c); 4 on rank 1 (b)"]


def test_a_single_process_run_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    assert make_accelerator(cpu=True).num_processes == 1


@pytest.mark.parametrize(("env", "refused"), [
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),  # --num_processes 2
    ({"ACCELERATE_USE_CPU": "False"}, False),  # accelerate launch of one process: no MASTER_PORT
    ({"MASTER_PORT": "29500", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False),  # torchrun / --multi_gpu
    ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500", "OMPI_COMM_WORLD_SIZE": "2"}, False),  # mpirun
    ({"MASTER_PORT": "29500"}, False),  # not started by accelerate launch
])
def test_the_single_launch_is_told_apart_by_what_the_launcher_sets(env: dict, refused: bool) -> None:
    argv = ["/repo/stages/cli.py", "student", "--out", "a b.safetensors"]
    if not refused:
        check_single_launch(env, argv, 2)
        return
    with pytest.raises(LaunchError) as err:
        check_single_launch(env, argv, 2)
    assert "accelerate launch --multi_gpu --num_processes 2 -m stages.cli student --out 'a b.safetensors'" \
        in str(err.value) and "torchrun --nproc_per_node 2 -m stages.cli student" in str(err.value)
    with pytest.raises(LaunchError, match="asked for more than one process .* --num_processes N -m stages.cli"):
        check_single_launch(env, ["/venv/bin/aekt", "student"], None)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
@pytest.mark.parametrize(("args", "count"), [(["--num_processes", "3"], 3), (["--num-processes=4"], 4),
                                             (["--multi_gpu"], None)])
def test_the_requested_count_is_read_from_the_launchers_command_line(args: list[str], count: int | None) -> None:
    # The child says it is up once it runs Python: before that, /proc shows the forked parent's cmdline.
    proc = subprocess.Popen([sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert requested_processes(proc.pid) == count
    finally:
        proc.communicate(timeout=30)


# ---- real launches ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_launch(flags: list[str], args: list[str], work: Path) -> subprocess.Popen:
    """`accelerate launch FLAGS --num_processes 2 -m stages.cli ARGS` on 127.0.0.1, with no accelerate
    config file (HF_HOME is private), so only the flags decide what it starts."""
    cmd = ["accelerate", "launch", *flags, "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port",
           str(free_port()), "-m", "stages.cli", *args]
    return subprocess.Popen(cmd, cwd=work, env=cli_env() | {"HF_HOME": str(work / "hf")}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch(flags: list[str], args: list[str], work: Path) -> subprocess.CompletedProcess:
    return finish(start_launch(flags, args, work))


def workspace(tiny_pipeline: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("params.yaml", "manifest.json", "teacher.safetensors", "teacher.json"):
        shutil.copy2(tiny_pipeline / name, dest / name)
    for name in ("shards", "store.zarr"):
        shutil.copytree(tiny_pipeline / name, dest / name)
    return dest


def test_accelerate_launch_multi_gpu_on_cpu_runs_two_gloo_ranks(tiny_pipeline: Path, tmp_path: Path) -> None:
    """Despite its name, --multi_gpu starts torchrun's two processes, which our stages (cpu=True
    without a GPU) join into one gloo world: the work is split, the store is the 1-process one."""
    work = workspace(tiny_pipeline, tmp_path / "w")
    proc = launch(["--multi_gpu"], CACHE, work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "summary.json").read_text())["processes"] == 2
    assert "8 mine" in proc.stderr and "6 mine" in proc.stderr  # whole shards: 4 + 3 of 7, x 2 views
    expected, got = store_arrays(tiny_pipeline / "store.zarr"), store_arrays(work / "new.zarr")
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


REFUSED = {"student": ([], STUDENT, "out"), "cache-with-cpu": (["--cpu"], CACHE, "new.zarr")}


@pytest.fixture(scope="module")
def refused_launches(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both launches below, started at once: each is one process that imports torch and exits, so on
    2 cores they overlap instead of queueing (each has its own workspace and port)."""
    started = {}
    for name, (flags, args, _) in REFUSED.items():
        work = workspace(tiny_pipeline, tmp_path_factory.mktemp(f"refused-{name}") / "w")
        started[name] = (work, start_launch(flags, args, work))
    try:
        return {name: (work, finish(proc)) for name, (work, proc) in started.items()}
    finally:
        for _, proc in started.values():
            proc.kill()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_accelerate_launch_without_multi_gpu_is_refused(refused_launches: dict, name: str) -> None:
    """Without --multi_gpu (or with --cpu) accelerate launch starts one process; it used to train alone."""
    _, args, output = REFUSED[name]
    work, proc = refused_launches[name]
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "asked for 2 processes but started only this one" in errors[0]
    assert f"accelerate launch --multi_gpu --num_processes 2 -m stages.cli {' '.join(args)}`" in errors[0]
    assert f"torchrun --nproc_per_node 2 -m stages.cli {' '.join(args)}`" in errors[0]
    assert not (work / output).exists()
