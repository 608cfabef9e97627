"""Training outputs under hostile conditions (issue 18): checkpoint ordering past 9,999 epochs,
non-finite teachers, unknown architectures, unwritable output paths, a full disk, oversized batches.

Each failure is one paragraph naming the key or option, with a non-zero exit, and leaves the
previous run's outputs as they were. Commands run through the real click group (`aekt_inproc`),
or as a real process where the operating system has to refuse a write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.run_state import checkpoint_dirs, load_checkpoint, save_checkpoint
from tests.pipeline_fixture import COMMANDS, aekt_inproc, copy_pipeline, snapshot, user_error, write_params

TEACHER = COMMANDS["teacher"]


# ---- 1. checkpoints are ordered by epoch number, not by folder name --------------------------

def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_pruning_and_resume_order_checkpoints_by_epoch_number(tmp_path: Path) -> None:
    model, opt = _tiny()
    for epoch in (9998, 9999, 10000):
        save_checkpoint(tmp_path, epoch=epoch, model=model, optimizer=opt,
                        state={"fingerprint": "f", "history": [{"epoch": epoch}]})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["epoch-9999", "epoch-10000"]
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest == {"epoch": 10000, "dir": "epoch-10000"} and (tmp_path / latest["dir"]).is_dir()
    assert load_checkpoint(tmp_path, model=model, optimizer=opt, fingerprint="f")["epoch"] == 10000
    save_checkpoint(tmp_path, epoch=10001, model=model, optimizer=opt, state={"fingerprint": "f", "history": []})
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["epoch-10000", "epoch-10001"]


def test_a_fresh_runs_first_checkpoint_replaces_the_older_run_only_once_written(tmp_path: Path) -> None:
    model, opt = _tiny()
    for epoch in (7, 8):
        save_checkpoint(tmp_path, epoch=epoch, model=model, optimizer=opt, state={"fingerprint": "old", "history": []})
    save_checkpoint(tmp_path, epoch=1, model=model, optimizer=opt, state={"fingerprint": "new", "history": []},
                    replace_others=True)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["epoch-0001"]


# ---- 2. a teacher with NaN/inf weights is an error, not a 10 % model ---------------------------

@pytest.fixture
def pipe(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_pipeline(tmp_path_factory, tmp_path / "pipeline")


def test_a_teacher_that_diverges_is_an_error_and_writes_nothing(pipe: Path) -> None:
    write_params(pipe, teacher={"lr": 1000.0, "momentum": 0.99})
    before = snapshot(pipe)
    message = user_error(aekt_inproc(TEACHER, pipe))
    assert "non-finite" in message and "params.yaml teacher.lr" in message, message
    assert snapshot(pipe) == before


def test_an_imported_teacher_with_nan_weights_is_refused(pipe: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.models import build_model

    state = build_model("digits_cnn", num_classes=10, in_channels=1).state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first][0] = float("nan")
    save_file(state, str(pipe / "nan.safetensors"))
    write_params(pipe, teacher={"checkpoint": "nan.safetensors", "arch": "digits_cnn"})
    before = snapshot(pipe)
    message = user_error(aekt_inproc(TEACHER, pipe))
    assert "nan.safetensors" in message and "NaN/inf" in message and first in message, message
    assert snapshot(pipe) == before


# ---- 3. an unknown architecture is a params.yaml error before any work -------------------------

@pytest.mark.parametrize(("section", "command", "typo", "meant"),
                         [("student", "student", "digits_mlp_16", "digits_mlp16"),
                          ("teacher", "teacher", "digit_cnn", "digits_cnn")])
def test_an_unknown_arch_names_the_key_and_the_nearest_names(pipe: Path, section: str, command: str,
                                                             typo: str, meant: str) -> None:
    write_params(pipe, **{section: {"arch": typo}})
    before = snapshot(pipe)
    message = user_error(aekt_inproc(COMMANDS[command], pipe))
    assert f"params.yaml {section}.arch" in message and repr(typo) in message, message
    assert f"Did you mean {meant!r}" in message and "resnet32x4" in message, message
    assert snapshot(pipe) == before
