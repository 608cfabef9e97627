"""The committed dvc.lock describes the committed code and params (tests/lock_check.py)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.lock_check import check, stale_entries

OUTS = {"data/shards/digits", "models/digits/teacher.safetensors"}


def test_missing_outputs_are_not_stale() -> None:
    status = {"prepare": [{"changed outs": {"data/shards/digits": "deleted"}}],
              "teacher": [{"changed deps": {"data/shards/digits": "deleted"}},
                          {"changed outs": {"models/digits/teacher.safetensors": "not in cache"}}]}
    assert stale_entries(status, OUTS) == []


def test_changed_code_params_and_commands_are_stale() -> None:
    status = {"teacher": [{"changed deps": {"pipeline/losses.py": "modified",
                                            "params.yaml": {"teacher.lr": "modified"}}}, "changed command"],
              "student": [{"changed deps": {"pipeline/gone.py": "deleted"}},
                          {"changed outs": {"metrics/student.json": "modified"}}]}
    problems = stale_entries(status, OUTS)
    assert problems == ["teacher: changed deps pipeline/losses.py modified",
                        "teacher: changed deps params.yaml:teacher.lr modified", "teacher: changed command",
                        "student: changed deps pipeline/gone.py deleted",
                        "student: changed outs metrics/student.json modified"]


def test_the_committed_lock_is_fresh_for_the_committed_tree() -> None:
    """Checked on a clean clone of HEAD, so uncommitted work in a developer's copy does not count."""
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no committed lock to compare")

    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
        assert check(clone) == []
