"""The CIFAR-10 preset end to end on a slice of the real JPEG tars, through real `dvc repro`.

`presets/cifar10-cpu.yaml`, cut further to 20 images per class (200 train + 200 test JPEGs, read
by offset from ../shared/data/cifar10-images/{train,test}.tar), 1 teacher epoch and 1 student
epoch, runs in a temporary copy of the repository. The student stage runs with 2 DataLoader
workers, so JPEG decoding in workers is exercised by the real stage; a second test checks that
workers 0 and 2 deliver the same samples, pixels and cached logits. About a minute on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from torch.utils.data import DataLoader

from pipeline.config import SECTIONS, load_params, section
from pipeline.data import Manifest, read_shard
from pipeline.data.safe_pickle import load_cifar_pickle
from pipeline.stream import ShardStream, StreamSpec
from stages.cli import main as aekt
from tests.conftest import REPO, SHARED_DATA, run
from tests.test_pipeline_dvc import copy_repo, ran_stages

CIFAR10 = SHARED_DATA / "cifar10-images"
OFFICIAL_META = SHARED_DATA / "cifar-10-batches-py" / "batches.meta"
# The official label order (batches.meta); the tars' sorted class folders must reproduce it.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
# Cuts on top of the CPU preset: ~1 minute end to end on 2 shared cores.
OVERRIDES = {
    "data": {"max_per_class": 20, "shard_size": 25},  # 8 train shards: 4 per DataLoader worker
    "teacher": {"epochs": 1},
    "train": {"epochs": 1, "workers": 2},
}


def preset_params() -> dict:
    """presets/cifar10-cpu.yaml with OVERRIDES and data.root made absolute (the copy is elsewhere)."""
    params = load_params(REPO / "presets" / "cifar10-cpu.yaml")
    for name, values in OVERRIDES.items():
        params[name].update(values)
    params["data"]["root"] = str(CIFAR10)
    return params


def test_presets_build_every_section() -> None:
    """Both presets are complete params files (every section, valid values), with CIFAR defaults."""
    for name in ("cifar10.yaml", "cifar10-cpu.yaml"):
        params = load_params(REPO / "presets" / name)
        assert set(params) == set(SECTIONS), name
        data, aug, loss = (section(params, s) for s in ("data", "augment", "loss"))
        assert (data.source, data.root, aug.recipe) == ("folder", "../shared/data/cifar10-images", "cifar")
        assert (loss.name, loss.tau, loss.alpha, loss.beta) == ("aekt", 4.0, 1.0, 8.0)
        assert aug.views >= section(params, "train").epochs  # no cached view reused (cycle)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ((CIFAR10 / "train.tar").is_file() and (CIFAR10 / "test.tar").is_file()):
        pytest.skip(f"{CIFAR10}/{{train,test}}.tar not present")
    repo = copy_repo(tmp_path_factory.mktemp("cifar10"))
    (repo / "params.yaml").write_text(yaml.safe_dump(preset_params(), sort_keys=False))
    # `inspect` (a report, not a dependency of the student) is left out to stay within the budget.
    log = run(["dvc", "repro", "evaluate"], repo, timeout=600).stdout
    assert ran_stages(log) == {"prepare", "teacher", "cache", "student", "evaluate"}
    return repo


def paths(repo: Path) -> dict[str, Path]:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    name, arch = params["data"]["name"], params["teacher"]["arch"]
    return {"manifest": repo / f"manifests/{name}.json", "store": repo / f"cache/{name}-{arch}.zarr",
            "shards": repo / f"data/shards/{name}", "teacher": repo / f"models/{name}/teacher.safetensors"}


def test_manifest_is_cifar10_in_official_order(reproduced: Path) -> None:
    manifest = Manifest.load(paths(reproduced)["manifest"])
    assert manifest.classes == CIFAR10_CLASSES
    if OFFICIAL_META.is_file():
        assert list(manifest.classes) == load_cifar_pickle(OFFICIAL_META)["label_names"]
    # the preset stores the decoded JPEG pixels (data.format: raw; test_raw_shards: same pixels as JPEG shards)
    assert manifest.image_format == "raw" and manifest.image_shape == (32, 32, 3) and manifest.channels == 3
    assert {k: s.num_samples for k, s in manifest.splits.items()} == {"train": 200, "test": 200}
    assert manifest.source["layout"] == "tars"


def test_train_shards_are_class_mixed(reproduced: Path) -> None:
    """The tars list images class by class; shards cut in that order would be single-class and a
    batch (drawn from one shard) would hold one class: the teacher stayed at chance."""
    p = paths(reproduced)
    manifest = Manifest.load(p["manifest"])
    for info in manifest.splits["train"].shards:
        labels = {s.label for s in read_shard(p["shards"] / info.name, expected_sha256=info.sha256)}
        assert len(labels) >= 5, (info.name, labels)


def test_verify_cache_replays_the_views(reproduced: Path) -> None:
    """Stage 1 and the replay read the same pixels (decoded from the JPEGs at prepare): ~0 error."""
    p = paths(reproduced)
    # The real `aekt verify-cache` command, run in this process: a fresh interpreter would spend
    # more time importing torch than verifying.
    result = CliRunner().invoke(aekt, [
        "verify-cache", "--params", str(reproduced / "params.yaml"), "--store", str(p["store"]),
        "--manifest", str(p["manifest"]), "--shards-dir", str(p["shards"]), "--teacher",
        str(p["teacher"]), "--samples", "32", "--json"], prog_name="aekt")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["params_replayable"] and report["codec"] == "fp16"
    assert report["max_abs_logit_error"] < 1e-2  # fp16 rounding of |logit| < 10


def test_student_and_eval_metrics_exist(reproduced: Path) -> None:
    student = json.loads((reproduced / "metrics/student.json").read_text())
    assert student["loss"] == "aekt" and student["teacher_mode"] == "cached" and student["epochs"] == 1
    assert 0.0 <= student["final_top1"] <= 1.0
    evaluation = json.loads((reproduced / "metrics/eval.json").read_text())
    assert evaluation["num_samples"] == 200 and 0.0 <= evaluation["teacher_agreement"] <= 1.0
    per_class = json.loads((reproduced / "plots/eval/per_class.json").read_text())["per_class_top1"]
    assert list(per_class) == list(CIFAR10_CLASSES)


def _one_epoch(stream: ShardStream, workers: int) -> dict[int, tuple]:
    """index -> (view, label, sha256 of the pixels, cached logits, deferred crop/flip params)."""
    seen: dict[int, tuple] = {}
    for batch in DataLoader(stream, batch_size=16, num_workers=workers):
        for i, index in enumerate(batch["index"].tolist()):
            assert index not in seen, f"sample {index} seen twice in one epoch"
            pixels = hashlib.sha256(batch["image"][i].numpy().tobytes()).hexdigest()
            seen[index] = (int(batch["view"][i]), int(batch["label"][i]), pixels,
                           tuple(batch["teacher"][i].tolist()), tuple(batch["params"][i].tolist()))
    return seen


def test_workers_0_and_2_see_the_same_samples(reproduced: Path) -> None:
    """JPEGs decode in DataLoader workers; the epoch's samples (and pixels, and logits) must not
    depend on the worker count. The order does (batches alternate between workers): compare sets."""
    p = paths(reproduced)
    # batch_augment: workers only decode, the trainer crops/flips the batch (what the stages use).
    for batch_augment in (False, True):
        spec = StreamSpec(manifest_path=p["manifest"], shards_dir=p["shards"], split="train",
                          recipe="cifar", image_size=32, aug_seed=0, views=2, seed=0,
                          store_path=p["store"], batch_augment=batch_augment)
        for epoch in (1, 2):  # views 1 and 0 of the store
            inline = _one_epoch(ShardStream(spec, epoch=epoch), workers=0)
            parallel = _one_epoch(ShardStream(spec, epoch=epoch), workers=2)
            assert sorted(inline) == list(range(200))
            assert parallel == inline
            assert {v[0] for v in inline.values()} == {epoch % 2}
