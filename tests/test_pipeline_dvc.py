"""The whole pipeline through real `dvc repro` in a temporary copy of the repository."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipeline.plots_page import find_chromium
from tests.conftest import REPO, cli_env, run


def copy_repo(dest: Path) -> Path:
    """Copy what a clean checkout has (tracked + untracked-not-ignored files) and commit it."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for stale in ("dvc.lock", "metrics", "plots", "manifests"):  # outputs of an earlier run
        target = dest / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dest)
    return dest


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


# What the first `dvc repro` left, read before later tests change the workspace (the KD run below
# replaces the student's outputs): `dvc status` and `dvc plots show --json` right after it, and the
# default (AEKT) student's metrics.
_REPRO: dict[str, str] = {}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    run(["dvc", "repro"], repo, timeout=900)
    _REPRO["status"] = run(["dvc", "status"], repo).stdout
    _REPRO["student"] = (repo / "metrics/student.json").read_text()
    _REPRO["plots"] = run(["dvc", "plots", "show", "--json"], repo).stdout
    return repo


def test_dvc_repro_runs_the_whole_pipeline(reproduced: Path) -> None:
    for path in ("manifests/digits.json", "data/shards/digits/train-00000.tar", "models/digits/teacher.safetensors",
                 "models/digits/teacher.json", "cache/digits-digits_cnn.zarr/zarr.json",
                 "models/digits/student.safetensors", "metrics/student.json", "metrics/eval.json",
                 "plots/train.csv", "plots/eval/confusion.png"):
        assert (reproduced / path).exists(), path
    teacher = json.loads((reproduced / "metrics/teacher.json").read_text())
    assert teacher["test_top1"] >= 0.97
    evaluation = json.loads((reproduced / "metrics/eval.json").read_text())
    assert evaluation["top1"] > 0.8  # chance is 0.1
    assert _REPRO["status"].strip().startswith("Data and pipelines are up to date")


@contextmanager
def edited_param(repo: Path, section: str, key: str, value: object) -> Iterator[None]:
    """params.yaml with one value changed, restored afterwards."""
    path = repo / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def kd_run(reproduced: Path) -> dict:
    """`loss.name: kd` written into params.yaml, then `dvc exp run` in the workspace (the default 40
    epochs) with dvclive/student/metrics.json polled while it trains; params.yaml restored after.
    One real run serves three checks: what a loss change reruns, what a user watching a run sees,
    and KD's top-1 against CE's."""
    live = reproduced / "dvclive/student/metrics.json"
    with edited_param(reproduced, "loss", "name", "kd"):
        status = json.loads(run(["dvc", "status", "--json"], reproduced).stdout)
        proc = subprocess.Popen(["dvc", "exp", "run"], cwd=reproduced, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        seen: set[int] = set()
        deadline = time.monotonic() + 600
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError, KeyError):  # not written yet, or caught mid-write
                    seen.add(json.loads(live.read_text())["step"])
                time.sleep(0.05)
            out = proc.communicate(timeout=60)[0]
        finally:
            proc.kill()
    return {"status": status, "returncode": proc.returncode, "log": out, "seen": seen,
            "student": json.loads((reproduced / "metrics/student.json").read_text())}


def test_loss_param_change_reruns_only_student_and_evaluate(kd_run: dict) -> None:
    assert kd_run["returncode"] == 0, kd_run["log"]
    assert set(kd_run["status"]) == {"student"}  # evaluate changes only once the student's outputs do
    assert ran_stages(kd_run["log"]) == {"student", "evaluate"}
    assert kd_run["student"]["loss"] == "kd" and kd_run["student"]["epochs"] == 40


def test_augment_change_reruns_cache_but_not_teacher(reproduced: Path) -> None:
    with edited_param(reproduced, "augment", "views", 4):
        status = json.loads(run(["dvc", "status", "--json"], reproduced).stdout)
        assert set(status) == {"cache", "student"}  # both read the augment section
        assert ran_stages(run(["dvc", "repro", "--dry"], reproduced).stdout) == {"cache", "student"}


def _commit_all(repo: Path, message: str) -> None:
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message, "--allow-empty"], repo)


def _wait_for_queue(repo: Path, names: list[str], timeout_s: float = 480) -> str:
    """`dvc queue status` once every named experiment has ended (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = run(["dvc", "queue", "status"], repo).stdout
        rows = {name: line for line in table.splitlines() for name in names if f" {name} " in f" {line} "}
        if len(rows) == len(names) and all(re.search(r"\b(Success|Failed)\b", r) for r in rows.values()):
            return table
        time.sleep(2)
    raise AssertionError(f"queue did not finish in {timeout_s} s:\n{table}")


@pytest.fixture(scope="module")
def queued_sweep(reproduced: Path) -> dict:
    """Two queued experiments (`dvc exp run --queue -S …`, `dvc queue start`): CE only at the default
    40 epochs (the baseline the distillation test compares with) and a 2-epoch one with several
    overrides. Returns the queue table, each experiment's `dvc queue logs`, and `dvc exp show`."""
    _commit_all(reproduced, "dvc repro")
    names = []
    for overrides in (["-S", "loss.name=ce"], ["-S", "loss.beta=6", "-S", "train.lr=0.05", "-S", "train.epochs=2"]):
        out = run(["dvc", "exp", "run", "--queue", *overrides], reproduced).stdout
        names.append(re.search(r"Queued experiment '([^']+)'", out).group(1))
    try:
        run(["dvc", "queue", "start", "-j", "1"], reproduced)
        table = _wait_for_queue(reproduced, names)
        logs = {name: run(["dvc", "queue", "logs", name], reproduced).stdout for name in names}
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=reproduced, capture_output=True, timeout=60)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], reproduced).stdout)
    experiments = {e["revs"][0]["name"]: e["revs"][0] for row in shown for e in (row.get("experiments") or [])}
    return {"names": names, "table": table, "logs": logs,
            "data": {name: experiments[name]["data"] for name in names if name in experiments}}


def test_queued_sweep_runs_only_the_student_from_the_one_stage_1(queued_sweep: dict) -> None:
    """Each queued experiment's temporary workspace checks shards, teacher and store out of the DVC
    cache (hard links), so only student and evaluate run; both results appear in `dvc exp show`.
    Stage 1 runs zero extra times."""
    table = queued_sweep["table"]
    assert table.count("Success") >= 2, table
    for log in queued_sweep["logs"].values():
        assert ran_stages(log) == {"student", "evaluate"}, log
        for skipped in ("prepare", "teacher", "cache"):
            assert f"Stage '{skipped}' didn't change, skipping" in log, log
    for name, (loss, epochs) in zip(queued_sweep["names"], (("ce", 40), ("aekt", 2)), strict=True):
        data = queued_sweep["data"][name]
        student = data["metrics"]["metrics/student.json"]["data"]
        assert 0.1 < student["final_top1"] <= 1.0
        assert student["loss"] == loss and student["epochs"] == epochs  # the -S values reached the stage
        params = data["params"]["params.yaml"]["data"]
        assert params["loss"]["name"] == loss and params["train"]["epochs"] == epochs


def test_distillation_from_the_cache_beats_ce_only(kd_run: dict, queued_sweep: dict) -> None:
    """The digits default: KD (the workspace `dvc exp run`) and AEKT (the `dvc repro` run) both beat
    the same student with CE only (the queued experiment): same params but `loss.name`, same store."""
    ce = queued_sweep["data"][queued_sweep["names"][0]]["metrics"]["metrics/student.json"]["data"]
    aekt = json.loads(_REPRO["student"])
    assert (ce["loss"], kd_run["student"]["loss"], aekt["loss"]) == ("ce", "kd", "aekt")
    top1 = {"ce": ce["final_top1"], "kd": kd_run["student"]["final_top1"], "aekt": aekt["final_top1"]}
    assert top1["kd"] > top1["ce"] + 0.02, top1
    assert top1["aekt"] > top1["ce"] + 0.02, top1


# ---- what a user watching a run sees: dvclive files that grow after each epoch while `dvc exp run`
# trains, their values in `dvc exp show` and `dvc plots`, and the offline plots page drawn by
# headless Chromium (skipped where it is not installed; `aekt plots --check` is the documented command)

def test_a_running_experiment_shows_each_finished_epoch(reproduced: Path, kd_run: dict) -> None:
    """`dvc exp run` retrains the student (40 epochs, the KD run above); dvclive/student/metrics.json
    was polled while it ran: it must show epochs as they finish, not only at the end."""
    assert kd_run["returncode"] == 0, kd_run["log"]
    final = json.loads((reproduced / "dvclive/student/metrics.json").read_text())
    assert final["step"] == 40
    assert len(kd_run["seen"] - {40}) >= 2, f"saw only epochs {sorted(kd_run['seen'])} while it ran"
    shown = json.loads(run(["dvc", "exp", "show", "--json"], reproduced).stdout)
    workspace = next(r for r in shown if r["rev"] == "workspace")["data"]["metrics"]
    assert workspace["dvclive/student/metrics.json"]["data"]["test_top1"] == pytest.approx(
        workspace["metrics/student.json"]["data"]["final_top1"])
    assert workspace["dvclive/teacher/metrics.json"]["data"]["step"] == 30


def test_dvc_plots_reads_the_live_files(reproduced: Path) -> None:
    """`dvc plots show` on the live files of the default (AEKT) run, so every AEKT loss term is drawn."""
    plots = json.loads(_REPRO["plots"])["data"]
    top1 = plots["test_top1_by_epoch"][0]["content"]
    assert {row["step"] for row in top1["data"]["values"]} >= {"1", "40"}
    loss = plots["loss_total_by_epoch"][0]["content"]
    assert loss["encoding"]["y"]["scale"]["type"] == "log"
    steps = [name for name in plots if name.startswith("dvclive/student-steps/plots/metrics/")]
    assert {Path(n).name for n in steps} >= {"total.tsv", "ce.tsv", "explicit.tsv", "implicit.tsv", "lr.tsv"}


@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium (Debian package `chromium`)")
def test_plots_page_renders_offline_with_every_chart_drawn(reproduced: Path, tmp_path: Path) -> None:
    shot = tmp_path / "plots.png"
    out = run(["aekt", "plots", "--out", str(tmp_path / "page"), "--check", "--screenshot", str(shot)], reproduced,
              timeout=300).stdout
    assert "charts drawn" in out and shot.stat().st_size > 10_000
    page = (tmp_path / "page/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "<script src=" not in page
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert "Y-axis titled 'class'" in lines["plots_inspect_per_class_confidence_csv"]
    assert "X-axis titled '1 - mean teacher p_t' for a log scale" in lines["plots_inspect_per_class_confidence_csv"]
    assert "X-axis titled 'class'" not in lines["plots_eval_per_class_csv"]
    assert "log scale" in lines["loss_total_by_epoch"]
