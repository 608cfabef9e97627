"""Stage 1 and stage 2 as 1 process, 1 node x 2 processes and 2 nodes x 1 process, side by side.

All three run on this machine through the real commands (`aekt cache`, `aekt student`): the plain
process; `torchrun --nproc_per_node 2`; and two concurrent `torchrun --nnodes 2 --node_rank R`
launches, each node with its own working folder, sharing the shard folder and the store (gloo on
127.0.0.1). Rounds are interleaved and the starting layout rotates, so a slow spell on a shared
machine lands on every layout alike. What it measures is the code path (rendezvous, whole-shard
split, collectives, joins), not a network: between real nodes the all-reduce crosses the wire.

Per layout: stage-1 seconds (lock to end, from the summary; the launch's wall time beside it) and
stage-2 images/s per epoch (train.csv, epochs after the first; all ranks' samples over the mean
rank time) and the student launch's wall time. Usage::

    python -m bench.multinode                 # CPU, full digits, ~3 min on 2 cores
    python -m bench.multinode --rounds 1 --epochs 2

The launch helpers (``node_command``, ``run_nodes``) are also what tests/test_multinode.py uses.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import REPO, base_parser, finish_cli, format_table, machine_info, paired_ratio, summary

NAME = "multinode"
LAYOUTS = {"1 process": (1, 1), "1 node x 2": (1, 2), "2 nodes x 1": (2, 1)}  # name -> (nodes, per node)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(kind: str, *, nodes: int, per_node: int, rank: int, port: int) -> list[str]:
    """The launcher prefix of node ``rank``: `python` (one plain process), `torchrun` or `accelerate`."""
    if kind == "python":
        assert nodes == per_node == 1, "a plain process is a world of one"
        return [sys.executable]
    if kind == "torchrun":
        return ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(per_node), "--node_rank", str(rank),
                "--rdzv-backend", "static", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    # --multi_gpu is what starts torchrun's processes, on CPU (gloo) as on GPUs: docs/pipeline.md.
    return ["accelerate", "launch", "--multi_gpu", "--num_machines", str(nodes), "--machine_rank", str(rank),
            "--num_processes", str(nodes * per_node), "--main_process_ip", "127.0.0.1", "--main_process_port",
            str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def node_env(folder: Path) -> dict[str, str]:
    """A node's own HOME, TMPDIR and HF_HOME (no accelerate config file); gloo on the loopback."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env | {"PYTHONUNBUFFERED": "1", "HOME": str(folder), "TMPDIR": str(folder),
                  "HF_HOME": str(folder / "hf"), "GLOO_SOCKET_IFNAME": "lo"}


def process_tree(root: int) -> set[int]:
    """``root`` and every process descending from it (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we read
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.add(child)
            todo.append(child)
    return tree


def _runs_stages(pid: int) -> bool:
    try:
        return b"stages.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class NodeRun:
    returncodes: list[int]
    logs: list[str]  # each node's stdout + stderr
    seconds: float  # from the first start to the last exit
    leftover: list[int]  # processes of the launch still running after it (should be none)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes) and not self.leftover

    def report(self) -> str:
        return "\n".join(f"--- node {r}: exit {rc}\n{log[-3000:]}"
                         for r, (rc, log) in enumerate(zip(self.returncodes, self.logs, strict=True)))


def run_nodes(kind: str, folders: list[Path], args: list[str], *, per_node: int = 1, name: str = "run",
              timeout: float = 180, grace: float = 20) -> NodeRun:
    """`<launcher> -m stages.cli ARGS` once per node folder, all started at once, each waited for
    at most ``timeout`` s; once one node fails, the others get ``grace`` s to stop. Whatever still
    runs then is killed with its whole process tree (torchrun starts workers in sessions of their
    own, so a process group is not enough)."""
    port, procs, seen = free_port(), [], set()
    logs = [folder / f"{name}.log" for folder in folders]
    start = time.perf_counter()
    try:
        for rank, folder in enumerate(folders):
            cmd = [*node_command(kind, nodes=len(folders), per_node=per_node, rank=rank, port=port),
                   "-m", "stages.cli", *args]
            with logs[rank].open("w") as log:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(cmd, cwd=folder, env=node_env(folder), stdout=log,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            for p in procs:
                seen |= process_tree(p.pid)
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in process_tree(p.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            p.wait(timeout=30)
    seconds = time.perf_counter() - start
    settle = time.monotonic() + 10  # workers exit right after their launcher reports
    while (left := sorted(pid for pid in seen if _runs_stages(pid))) and time.monotonic() < settle:
        time.sleep(0.2)
    return NodeRun([p.returncode for p in procs], [log.read_text() for log in logs], seconds, left)


# ---- the benchmark ---------------------------------------------------------------------------------

def prepare(root: Path, *, epochs: int, views: int) -> Path:
    """Full digits: shards, manifest and a 2-epoch teacher, built once by the real commands."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"]["epochs"] = 2
    params["augment"]["views"] = views
    params["train"]["epochs"] = epochs
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for args in (["prepare", "--shards-dir", "shards", "--manifest", "manifest.json"],
                 ["teacher", "--manifest", "manifest.json", "--shards-dir", "shards", "--out",
                  "teacher.safetensors", "--metrics", "teacher-metrics.json", "--history", "teacher.csv",
                  "--no-progress"]):
        done = run_nodes("python", [root], args, name=args[0], timeout=600)
        if not done.ok:
            raise SystemExit(f"preparing the benchmark failed:\n{done.report()}")
    return root


def node_folders(base: Path, root: Path, count: int) -> list[Path]:
    folders = []
    for rank in range(count):
        folder = base / f"node{rank}"
        folder.mkdir(parents=True)
        for name in ("params.yaml", "manifest.json", "teacher.safetensors", "teacher.json"):
            shutil.copy2(root / name, folder / name)
        folders.append(folder)
    return folders


def measure(root: Path, work: Path, layout: str) -> dict[str, float]:
    """One round of one layout: stage 1 into a fresh store, then stage 2 from it."""
    nodes, per_node = LAYOUTS[layout]
    kind = "python" if nodes * per_node == 1 else "torchrun"
    folders = node_folders(work, root, nodes)
    store, shards = str(work / "store.zarr"), str(root / "shards")
    common = ["--manifest", "manifest.json", "--shards-dir", shards, "--teacher", "teacher.safetensors",
              "--store", store, "--no-progress"]
    cache = run_nodes(kind, folders, ["cache", *common, "--summary", "cache.json"], per_node=per_node,
                      name="cache")
    student = run_nodes(kind, folders, ["student", *common, "--out", "student.safetensors", "--metrics",
                                        "student.json", "--history", "train.csv", "--checkpoints", "ckpt"],
                        per_node=per_node, name="student") if cache.ok else cache
    if not student.ok:
        raise SystemExit(f"{layout}: a launch failed:\n{student.report()}")
    with (folders[0] / "train.csv").open() as f:
        rates = [float(row["img_per_s"]) for row in csv.DictReader(f)][1:]  # the first epoch warms up
    return {"stage1_s": json.loads((folders[0] / "cache.json").read_text())["seconds"],
            "stage1_launch_s": cache.seconds, "stage2_img_per_s": statistics.median(rates),
            "stage2_launch_s": student.seconds}


def run(*, rounds: int, epochs: int, views: int, workdir: Path | None = None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-multinode-", dir=workdir))
    try:
        root = prepare(tmp / "data", epochs=epochs, views=views)
        names = list(LAYOUTS)
        results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(measure(root, tmp / f"r{r}-{name.replace(' ', '')}", name))
        metrics = ("stage1_s", "stage1_launch_s", "stage2_img_per_s", "stage2_launch_s")
        by_layout = {n: {m: summary([x[m] for x in results[n]]) for m in metrics} for n in names}
        manifest = json.loads((root / "manifest.json").read_text())
        train = manifest["splits"]["train"]
        ratios = {f"{a} / {b}": {m: paired_ratio([x[m] for x in results[a]], [x[m] for x in results[b]])
                                 for m in metrics}
                  for a, b in (("1 node x 2", "1 process"), ("2 nodes x 1", "1 process"),
                               ("2 nodes x 1", "1 node x 2"))}
        return {"benchmark": NAME, "machine": machine_info(torch.device("cpu")),
                "config": {"dataset": "digits", "train_samples": train.get("num_samples"),
                           "shards": len(train["shards"]), "views": views, "epochs": epochs,
                           "rounds": rounds, "teacher": "digits_cnn", "student": "digits_mlp (aekt, cached)",
                           "backend": "gloo on 127.0.0.1, one machine"},
                "layouts": by_layout, "ratios": ratios}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="stage-2 epochs per run (the first is not timed).")
    parser.add_argument("--views", type=int, default=8, help="stage-1 views (augment.views).")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("--device: this benchmark launches CPU processes (gloo); on GPUs run the commands of "
                         "docs/pipeline.md 'From one machine to a cluster' instead.")
    payload = run(rounds=args.rounds, epochs=args.epochs, views=args.views)
    rows = [[name, m["stage1_s"]["median"], m["stage1_launch_s"]["median"], m["stage2_img_per_s"]["median"],
             m["stage2_launch_s"]["median"]] for name, m in payload["layouts"].items()]
    rows += [[name, r["stage1_s"]["median"], r["stage1_launch_s"]["median"], r["stage2_img_per_s"]["median"],
              r["stage2_launch_s"]["median"]] for name, r in payload["ratios"].items()]
    table = format_table(["layout (ratios: median of per-round ratios)", "stage-1 s", "stage-1 launch s",
                          "stage-2 img/s", "stage-2 launch s"], rows)
    return finish_cli(args, payload, table, name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
