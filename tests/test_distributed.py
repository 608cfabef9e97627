"""The launch-trap check: a world Accelerate does not see is an error, not N duplicate runs."""

from __future__ import annotations

import pytest

from pipeline.distributed import LaunchError, check_world, make_accelerator


def test_a_world_mismatch_is_refused_with_the_launch_command() -> None:
    with pytest.raises(LaunchError, match="torchrun --nproc_per_node N"):
        check_world(1, 2, "NO")
    check_world(2, 2, "MULTI_CPU")


def test_a_single_process_run_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert make_accelerator(cpu=True).num_processes == 1
