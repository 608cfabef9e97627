"""Multi-node runs, on one machine: stage 1 and stage 2 launched as 2 nodes x 1 process.

Each node is a separate launcher invocation (`torchrun --nnodes 2 --node_rank R` or `accelerate
launch --num_machines 2 --machine_rank R`), started concurrently with its own working folder
(params, manifest, teacher, outputs), HOME, TMPDIR and HF_HOME, as a real node would have; they
share only what nodes share on a cluster: the shard folder and the store path (a shared file
system). The world forms over gloo on 127.0.0.1. Every wait is bounded; on failure or timeout both
nodes' whole process trees are killed, and no process of a launch may outlive it.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bench.multinode import run_nodes

NODES = 2
TIMEOUT_S = 180  # one launch of both nodes; a healthy one takes ~10 s here
GRACE_S = 20  # how long the other node may take to notice that one node failed, before it is killed


def student_args(shared: Path, *extra: str) -> list[str]:
    return ["student", "--manifest", "manifest.json", "--shards-dir", str(shared / "shards"), "--teacher",
            "teacher.safetensors", "--store", str(shared / "store.zarr"), "--out", "out/student.safetensors",
            "--metrics", "out/metrics.json", "--history", "out/train.csv", "--checkpoints", "out/ckpt",
            "--no-progress", *extra]


def cache_args(shared: Path) -> list[str]:
    return ["cache", "--manifest", "manifest.json", "--shards-dir", str(shared / "shards"), "--teacher",
            "teacher.safetensors", "--store", str(shared / "store.zarr"), "--summary", "out/cache.json",
            "--no-progress"]


def node_folder(tiny_pipeline: Path, dest: Path) -> Path:
    """What one node holds locally: the checkout's params and manifest, its copy of the teacher."""
    dest.mkdir(parents=True)
    for name in ("manifest.json", "teacher.safetensors", "teacher.json"):
        shutil.copy2(tiny_pipeline / name, dest / name)
    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["train"]["checkpoint_every"] = 1
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def cluster(tiny_pipeline: Path, root: Path, *, store: bool = False) -> tuple[Path, list[Path]]:
    """(shared folder with the shards [and the 1-process store], one local folder per node)."""
    shared = root / "shared"
    shutil.copytree(tiny_pipeline / "shards", shared / "shards")
    if store:
        shutil.copytree(tiny_pipeline / "store.zarr", shared / "store.zarr")
    return shared, [node_folder(tiny_pipeline, root / f"node{rank}") for rank in range(NODES)]


def launch(kind: str, nodes: list[Path], args: list[str], name: str, per_node: int = 1) -> list[str]:
    """Each node's log of a launch that must succeed and leave no process behind."""
    done = run_nodes(kind, nodes, args, per_node=per_node, name=name, timeout=TIMEOUT_S, grace=GRACE_S)
    assert all(rc == 0 for rc in done.returncodes), f"{kind} {args[0]} on {len(nodes)} node(s) failed:\n{done.report()}"
    assert not done.leftover, f"processes {done.leftover} of the launch outlived it"
    return done.logs


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(out: Path) -> dict[str, torch.Tensor]:
    student = load_file(str(out / "student.safetensors"))
    return student | {f"head/{k}": v for k, v in load_file(str(out / "student-head.safetensors")).items()}


def history(out: Path) -> list[dict[str, str]]:
    """train.csv without its timing column (wall-clock speed differs run to run)."""
    with (out / "train.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "img_per_s"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def two_process_student(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: `torchrun --nproc_per_node 2` on one node, same params. Its ``out`` folder."""
    work = node_folder(tiny_pipeline, tmp_path_factory.mktemp("one-node") / "w")
    shared = work.parent
    shutil.copytree(tiny_pipeline / "shards", shared / "shards")
    shutil.copytree(tiny_pipeline / "store.zarr", shared / "store.zarr")
    launch("torchrun", [work], student_args(shared), "student", per_node=2)
    return work / "out"


def test_two_nodes_write_the_one_process_store(tiny_pipeline: Path, tmp_path: Path) -> None:
    shared, nodes = cluster(tiny_pipeline, tmp_path)
    logs = launch("torchrun", nodes, cache_args(shared), "cache")
    # Each node is its own global rank and takes whole shards s with s mod 2 == rank (7 shards, 2 views).
    assert "rank 0: 14 of 14 (view, shard) items pending, 8 mine (shards 0, 2, 4, 6)" in logs[0], logs[0]
    assert "rank 1: 14 of 14 (view, shard) items pending, 6 mine (shards 1, 3, 5)" in logs[1], logs[1]
    assert "rank 1" not in logs[0] and "rank 0" not in logs[1]
    # One store, byte for byte the 1-process one (every chunk, every done marker, the metadata); its
    # lock beside it is the only other thing written to the shared folder.
    assert sorted(p.name for p in shared.iterdir()) == ["shards", "store.zarr", "store.zarr.lock"]
    assert file_digests(shared / "store.zarr") == file_digests(tiny_pipeline / "store.zarr")
    assert (nodes[0] / "out" / "cache.json").is_file() and not (nodes[1] / "out").exists()


def test_nodes_with_different_params_are_refused_before_any_row(tiny_pipeline: Path, tmp_path: Path) -> None:
    """Each node reads its own params.yaml: a stale copy on node 1 used to write its half of the
    store with other augmentation parameters under node 0's provenance. Now every rank stops, with
    the same message, before the store exists."""
    shared, nodes = cluster(tiny_pipeline, tmp_path)
    params = yaml.safe_load((nodes[1] / "params.yaml").read_text())
    params["augment"]["seed"] = 1
    (nodes[1] / "params.yaml").write_text(yaml.safe_dump(params))
    done = run_nodes("torchrun", nodes, cache_args(shared), name="cache", timeout=TIMEOUT_S, grace=GRACE_S)
    assert done.returncodes != [0, 0] and not done.leftover
    for log in done.logs:
        errors = [line for line in log.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, log[-3000:]
        assert "the processes do not run from the same inputs — augment_seed: 0 on rank 0 (" in errors[0]
        assert "; 1 on rank 1 (" in errors[0] and "give every node the same ones" in errors[0]
    assert sorted(p.name for p in shared.iterdir()) == ["shards"]


def test_two_nodes_train_the_one_node_student(tiny_pipeline: Path, two_process_student: Path,
                                              tmp_path: Path) -> None:
    """The same two ranks on one node or on two: the same student, exactly, and the same history.
    Launched with `accelerate launch --num_machines 2` (the stage-1 test uses torchrun; each launcher
    was also run on the other stage, with the same results: kept to one launch per test for time)."""
    shared, nodes = cluster(tiny_pipeline, tmp_path, store=True)
    launch("accelerate", nodes, student_args(shared), "student")
    out = nodes[0] / "out"
    assert [int(row["samples"]) for row in history(out)] == [200, 200, 200]  # every sample once per epoch
    reference, got = weights(two_process_student), weights(out)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(got[key], value), key
    assert history(out) == history(two_process_student)
    # Only the main process writes outputs (model, metrics, checkpoints): node 1 has none.
    assert (out / "ckpt" / "epoch-0003").is_dir() and not (nodes[1] / "out").exists()


def test_a_two_node_run_resumes_from_the_checkpoints_on_the_main_node(
        tiny_pipeline: Path, two_process_student: Path, tmp_path: Path) -> None:
    """Checkpoints are written by the main process only, so they may live on node 0 alone: node 1
    resumes from what rank 0 loaded (it used to look in its own, empty folder and stop with
    "no checkpoint to resume from" while node 0 resumed)."""
    shared, nodes = cluster(tiny_pipeline, tmp_path, store=True)
    ckpt = nodes[0] / "out" / "ckpt"
    shutil.copytree(two_process_student / "ckpt", ckpt)
    shutil.rmtree(ckpt / "epoch-0003")  # as if both nodes had died during epoch 3
    logs = launch("torchrun", nodes, student_args(shared, "--resume"), "resume")
    assert "resumed from out/ckpt/epoch-0002 (epoch 2)" in logs[0]
    got, reference = weights(nodes[0] / "out"), weights(two_process_student)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key
    assert history(nodes[0] / "out") == history(two_process_student)
