"""A DVC remote on S3 (moto on loopback): one clone runs stage 1 and `dvc push`es; a fresh clone
`dvc pull`s and `dvc repro` runs only the student and evaluate stages (stage 1 is not recomputed).

The remote is set up as docs/pipeline.md says: `dvc remote add -d` with the bucket URL (committed),
credentials and endpoint from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL), so nothing secret or machine-specific is committed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import run
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET, s3_objects
from tests.test_pipeline_dvc import copy_repo, ran_stages

# A small default: seconds per stage on two cores.
SMALL = {"data": {"max_per_class": 20, "shard_size": 32}, "teacher": {"epochs": 1}, "augment": {"views": 2},
         "train": {"epochs": 1}}
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _small_repo(dest: Path) -> Path:
    repo = copy_repo(dest)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([*GIT, "commit", "-qam", "small params"], repo)
    return repo


def test_a_fresh_clone_pulls_stage_1_from_s3_and_reruns_only_the_student(tmp_path: Path, bucket: str,
                                                                         s3_env: str) -> None:
    first = _small_repo(tmp_path / "first")
    run(["dvc", "remote", "add", "-d", "storage", f"{bucket}/dvc"], first)
    out = run(["dvc", "repro", "inspect"], first, timeout=600).stdout  # prepare, teacher, cache, inspect
    assert {"prepare", "teacher", "cache"} <= ran_stages(out)
    run([*GIT, "add", "-A"], first)
    run([*GIT, "commit", "-qm", "stage 1 and its remote"], first)
    run(["dvc", "push"], first, timeout=300)
    pushed = s3_objects(f"{bucket}/dvc")
    assert len(pushed) > 10

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / ".dvc" / "cache").exists() and not (second / "cache").exists()
    run(["dvc", "pull", "--with-deps", "cache"], second, timeout=300)  # stage 1 and what it depends on
    assert (second / "cache/digits-digits_cnn.zarr/zarr.json").is_file()
    out = run(["dvc", "repro"], second, timeout=600).stdout
    assert ran_stages(out) == {"student", "evaluate"}, out
    assert run(["dvc", "status"], second).stdout.strip().startswith("Data and pipelines are up to date")

    committed = run(["git", "show", "HEAD"], first).stdout  # the commit of dvc.lock and the remote
    assert f"url = {bucket}/dvc" in committed and "dvc.lock" in committed
    for secret in (FAKE_KEY_ID, FAKE_SECRET, s3_env, s3_env.split("//")[1]):
        assert secret not in committed, f"{secret!r} was committed"
