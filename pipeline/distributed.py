"""Accelerate set-up shared by the multi-process stages, with the launch-trap check.

``accelerate launch --multi_gpu`` without GPUs starts processes that each believe they are alone,
and would silently train (or cache) N times over; see DESIGN.md "Multi-process launch".
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator

from pipeline.errors import UserError


class LaunchError(UserError, RuntimeError):
    """The processes started do not form the world the launcher asked for."""


def check_world(seen: int, launched: int, distributed_type: object) -> None:
    """Raise LaunchError unless Accelerate's world is the one the launcher started."""
    if seen != launched:
        raise LaunchError(
            f"the launcher started {launched} processes but Accelerate sees a world of {seen} "
            f"(distributed type {distributed_type}); each process would do the whole job. On CPU "
            "launch with `torchrun --nproc_per_node N`; on GPUs with `accelerate launch --multi_gpu "
            "--num_processes N`.")


def make_accelerator(**kwargs: Any) -> Accelerator:
    accelerator = Accelerator(**kwargs)
    check_world(accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1")),
                accelerator.distributed_type)
    return accelerator
