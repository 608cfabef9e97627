"""Accelerate set-up shared by the multi-process stages, with checks that the launch did what was asked.

What the launchers start, checked with accelerate 1.15 on a CPU-only machine (docs/pipeline.md,
"Launching N processes"): `torchrun --nproc_per_node N` and `accelerate launch --multi_gpu
--num_processes N` (torchrun underneath) start N processes with WORLD_SIZE=N, which form one gloo
world because the stages pass ``cpu=True`` when torch sees no GPU. `accelerate launch
--num_processes N` without `--multi_gpu`, or with `--cpu`, starts ONE process: it would silently do
the whole job alone. That process has no WORLD_SIZE but MASTER_ADDR/MASTER_PORT, which the launcher
sets only when asked for more than one process, so it can be told apart and refused.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator

from pipeline.errors import UserError

# Set by whatever started a process of a multi-process world (torchrun, or mpirun for MPI).
_WORLD_VARS = ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(UserError, RuntimeError):
    """The processes started do not form the world the launcher asked for."""


def check_world(seen: int, launched: int, distributed_type: object) -> None:
    """Raise LaunchError unless Accelerate's world is the one the launcher started."""
    if seen != launched:
        raise LaunchError(
            f"the launcher started {launched} processes but Accelerate sees a world of {seen} "
            f"(distributed type {distributed_type}); each process would do the whole job. Launch with "
            "`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` (on CPU "
            "as on GPUs).")


def check_single_launch(env: Mapping[str, str], argv: list[str], requested: int | None = None) -> None:
    """Raise LaunchError when `accelerate launch` was asked for several processes but started only
    this one (its simple launcher: ACCELERATE_USE_CPU and MASTER_PORT set, no world variables).
    ``argv`` is this process's command line, ``requested`` the launcher's --num_processes if known."""
    if "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env or any(v in env for v in _WORLD_VARS):
        return
    n = str(requested) if requested else "N"
    script = "-m stages.cli" if Path(argv[0]).name == "aekt" or argv[0].endswith("stages/cli.py") else argv[0]
    command = " ".join([script, *map(shlex.quote, argv[1:])])
    raise LaunchError(
        f"`accelerate launch` was asked for {f'{requested} processes' if requested else 'more than one process'}"
        " but started only this one: without --multi_gpu (and always with --cpu) it runs a single process, "
        f"which would do the whole job alone. Launch them with `accelerate launch --multi_gpu --num_processes "
        f"{n} {command}` (on CPU as on GPUs) or `torchrun --nproc_per_node {n} {command}`. (accelerate launch "
        "sets MASTER_ADDR/MASTER_PORT only for more than one process; if they come from your shell and you "
        "meant one process, unset them.)")


def requested_processes(pid: int) -> int | None:
    """--num_processes from the command line of process ``pid`` (the launcher), where Linux shows it;
    only used to print the exact command (a count from an accelerate config file is not read)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(args):
        found = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", arg)
        if found:
            value = found.group(1) or (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else None
    return None


def make_accelerator(**kwargs: Any) -> Accelerator:
    check_single_launch(os.environ, sys.argv, requested_processes(os.getppid()))
    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1")),
                accelerator.distributed_type)
    return accelerator


def broadcast_object(value: Any, *, src: int, world: int) -> Any:
    """``value`` as rank ``src`` holds it, on every rank (a collective: every rank calls it; the
    others pass anything, e.g. None). Tensors in it should be on the CPU: unpickled, a CUDA tensor
    lands on the sender's device index."""
    if world == 1:
        return value
    payload = [value]
    dist.broadcast_object_list(payload, src=src)
    return payload[0]


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


def share_optimizer_state(optimizer: torch.optim.Optimizer, steps_done: int, *, rank: int, world: int) -> None:
    """Give every rank the optimizer state of a rank that ran the most steps this epoch.

    With uneven shards a rank that runs out joins early (DDP's ``Join``) and skips the remaining
    optimizer steps; on leaving ``Join`` DDP copies the weights of the last joiner (the highest rank
    among those that ran the most steps) to every rank, but not the optimizer state: the momentum
    of an early joiner would lag from then on, ranks would update the same averaged gradients
    differently, and a checkpoint (rank 0's state) would not be what every rank trained from. This
    copies the optimizer state from the same rank DDP takes the weights from. A collective."""
    if world == 1:
        return
    done = [0] * world
    dist.all_gather_object(done, steps_done)
    src = max(r for r, n in enumerate(done) if n == max(done))
    state = broadcast_object(_on_cpu(optimizer.state_dict()) if rank == src else None, src=src, world=world)
    if rank != src:
        optimizer.load_state_dict(state)


def input_mismatches(per_rank: list[tuple[str, Mapping[str, str]]]) -> list[str]:
    """For every input whose value differs between ranks, one line naming which ranks (and hosts)
    hold which value; ``per_rank[r]`` is rank r's (host, {input name: value})."""
    lines = []
    for name in sorted({k for _, inputs in per_rank for k in inputs}):
        holders: dict[str, list[str]] = {}
        for rank, (host, inputs) in enumerate(per_rank):
            holders.setdefault(inputs.get(name, "(missing)"), []).append(f"{rank} ({host})")
        if len(holders) > 1:
            shown = [f"{value[:24] + '…' if len(value) > 25 else value} on rank {', '.join(ranks)}"
                     for value, ranks in holders.items()]
            lines.append(f"{name}: " + "; ".join(shown))
    return lines


def check_same_inputs(inputs: Mapping[str, str], *, world: int) -> None:
    """Raise LaunchError on every rank unless all ranks computed the same ``inputs`` (name -> value).

    On one machine every process reads the same params.yaml, manifest and teacher; on several
    nodes each reads its own copy, and a stale one would silently mix two configurations into one
    store or one training run. A collective: every rank calls it."""
    if world == 1:
        return
    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, (socket.gethostname(), dict(inputs)))
    differ = input_mismatches(per_rank)
    if differ:
        raise LaunchError(
            "the processes do not run from the same inputs — " + " | ".join(differ) + ". Each node reads "
            "its own params.yaml, manifest and teacher: give every node the same ones (check out the same "
            "commit, `dvc pull` the same outputs), then relaunch.")
