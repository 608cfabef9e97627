"""Training outputs under hostile conditions (issue 18): checkpoint ordering past 9,999 epochs,
non-finite teachers, unknown architectures, unwritable output paths, a full disk, oversized batches.

Each failure is one paragraph naming the key or option, with a non-zero exit, and leaves the
previous run's outputs as they were. Commands run through the real click group (`aekt_inproc`),
or as a real process where the operating system has to refuse a write.
"""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.artifacts import ArtifactError, check_writable
from pipeline.run_state import checkpoint_dirs, load_checkpoint, save_checkpoint
from tests.conftest import cli_env
from tests.pipeline_fixture import COMMANDS, aekt_inproc, copy_pipeline, snapshot, user_error, write_params

STUDENT, TEACHER, EVALUATE = COMMANDS["student"], COMMANDS["teacher"], COMMANDS["evaluate"]


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
    assert "non-finite" in message and "lower teacher.lr in params.yaml" in message, message
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


# ---- 4. an output path that cannot be written is found before any work ------------------------

def _replace_with_file(root: Path, rel: str) -> None:
    import shutil

    shutil.rmtree(root / rel)
    (root / rel).write_text("a file where a folder belongs\n")


@pytest.mark.parametrize(("command", "option", "folder"), [
    ("student", "--metrics", "metrics"),
    ("student", "--checkpoints", "runs"),
    ("teacher", "--out", "models"),
    ("evaluate", "--plots", "plots"),
])
def test_an_output_under_a_file_is_an_error_before_any_work(pipe: Path, command: str, option: str,
                                                            folder: str) -> None:
    _replace_with_file(pipe, folder)
    write_params(pipe, train={"epochs": 100000}, teacher={"epochs": 100000})  # would run for hours
    before = snapshot(pipe)
    args = COMMANDS[command]
    message = user_error(aekt_inproc(args, pipe))
    assert message.startswith(f"{option} {args[args.index(option) + 1]}: "), message
    assert "folder" in message and "Nothing was run" in message, message
    assert snapshot(pipe) == before


def test_check_writable_refuses_a_folder_for_a_file_and_a_file_for_a_folder(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="^--out .*dir: this is a folder where a file is expected"):
        check_writable(**{"--out": tmp_path / "dir"})
    with pytest.raises(ArtifactError, match="^--plots .*file: this is a file, not a folder"):
        check_writable(folders={"--plots": tmp_path / "file"})
    check_writable(**{"--out": tmp_path / "new" / "deeper" / "m.safetensors"}, folders={"--plots": tmp_path / "p"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # checking creates nothing


# ---- 5. a full disk while writing outputs leaves the previous outputs as they were ----------

def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
    return preexec


@pytest.mark.parametrize("checkpoint_every", [1, 0], ids=["checkpoint-write", "model-write"])
def test_a_full_disk_during_student_writes_keeps_the_previous_outputs(pipe: Path, checkpoint_every: int) -> None:
    write_params(pipe, train={"checkpoint_every": checkpoint_every})
    before = snapshot(pipe)
    # Larger than the metrics/CSV/JSON files, smaller than the student's weights (~10 kB).
    proc = subprocess.run(["aekt", *STUDENT], cwd=pipe, env=cli_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=_limit_file_size(8000))
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "[errno 27]" in last, proc.stderr[-2000:]
    assert snapshot(pipe) == before
    leftovers = [p for p in pipe.rglob("*.tmp*") if p.name.startswith(".")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("command", ["evaluate", "teacher"])
def test_a_full_disk_during_evaluate_or_teacher_writes_keeps_the_previous_outputs(pipe: Path, command: str) -> None:
    """evaluate writes its report as one set (metrics, per-class files, confusion PNG), the teacher its
    weights with their card: 8000 bytes lets the small files through and stops the PNG / weights."""
    before = snapshot(pipe)
    proc = subprocess.run(["aekt", *COMMANDS[command]], cwd=pipe, env=cli_env(), capture_output=True, text=True,
                          timeout=180, preexec_fn=_limit_file_size(8000))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "[errno 27]" in last, proc.stderr[-2000:]
    assert snapshot(pipe) == before
    assert not [p for p in pipe.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


# ---- 6. a batch larger than the training split ---------------------------------------------

@pytest.mark.parametrize(("section", "command"), [("train", "student"), ("teacher", "teacher")])
def test_a_batch_larger_than_the_training_split_is_a_params_error(pipe: Path, section: str, command: str) -> None:
    write_params(pipe, **{section: {"batch_size": 100000}})
    before = snapshot(pipe)
    message = user_error(aekt_inproc(COMMANDS[command], pipe))
    assert f"params.yaml {section}.batch_size: 100000" in message and "300 samples" in message, message
    assert snapshot(pipe) == before
