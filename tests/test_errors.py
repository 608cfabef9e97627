"""Bad inputs, one row each: the stage that meets it fails with one paragraph naming the file or key,
the reason and the command that fixes it, exits non-zero, and leaves existing outputs untouched.

docs/errors.md lists the same errors for users. Commands run in-process through the real click
group (`aekt_inproc`); test_reliability.py runs real processes, whose stderr ends the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from pipeline.artifacts import read_card, save_model
from pipeline.cache.store import LogitStore
from pipeline.data.manifest import canonical_sha256
from pipeline.models import build_model
from tests.conftest import REPO
from tests.pipeline_fixture import (
    COMMANDS,
    MANIFEST,
    STORE,
    aekt_inproc,
    assert_same_store,
    built_pipeline,
    copy_pipeline,
    snapshot,
    user_error,
    write_params,
)

Mutate = Callable[[Path], None]
CACHE = [a for a in COMMANDS["cache"] if a != "--rebuild"]
STUDENT, EVALUATE, RESUME = COMMANDS["student"], COMMANDS["evaluate"], [*COMMANDS["student"], "--resume"]
TEACHER = "models/teacher.safetensors"


# ---- ways to break a pipeline ----------------------------------------------------------------

def truncate(rel: str) -> Mutate:
    def mutate(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])
    return mutate


def flip_byte(rel: str) -> Mutate:
    def mutate(root: Path) -> None:
        data = bytearray((root / rel).read_bytes())
        data[len(data) // 3] ^= 0xFF  # inside an image member: the tar still parses
        (root / rel).write_bytes(bytes(data))
    return mutate


def delete(rel: str) -> Mutate:
    return lambda root: (root / rel).unlink()


def params(section: str, key: str, value: object) -> Mutate:
    return lambda root: write_params(root, **{section: {key: value}})


def raw_params(content: bytes) -> Mutate:
    """Replace params.yaml by these bytes (what a bad editor save or a bad merge leaves)."""
    return lambda root: (root / "params.yaml").write_bytes(content)


def edit_manifest(change: Callable[[dict], None], *, rehash: bool) -> Mutate:
    """Edit the manifest's JSON; ``rehash`` keeps it self-consistent (a real, other dataset)."""
    def mutate(root: Path) -> None:
        raw = json.loads((root / MANIFEST).read_text())
        change(raw)
        if rehash:
            raw["sha256"] = canonical_sha256({k: v for k, v in raw.items() if k != "sha256"})
        (root / MANIFEST).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return mutate


def _drop_last_train_shard(raw: dict) -> None:
    split = raw["splits"]["train"]
    split["num_samples"] -= split["shards"].pop()["count"]


def _rename_class(raw: dict) -> None:
    raw["classes"][0] = "zero"


def store_built_with(**changes: object) -> Mutate:
    """Replace the store by one built for other inputs (e.g. another class count)."""
    def mutate(root: Path) -> None:
        prov = LogitStore.open(root / STORE).provenance
        store = LogitStore.create(root / STORE, dataclasses.replace(prov, **changes))
        store.group["done"][...] = 1
    return mutate


def poke_logits(view: int, index: int, value: float) -> Mutate:
    def mutate(root: Path) -> None:
        zarr.open_array(str(root / STORE / "logits"), mode="r+")[view, index, 3] = value
    return mutate


def unmark(view: int, shard: int) -> Mutate:
    return delete(f"{STORE}/done/c/{view}/{shard}")


def _perturbed_teacher(root: Path) -> dict:
    weights = load_file(str(root / TEACHER))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 0.01
    return weights


def retrain_teacher(root: Path) -> None:
    """A different, valid teacher artifact (weights + card), as `aekt teacher` would write."""
    card = read_card(root / TEACHER)
    model = build_model(card["arch"], num_classes=card["num_classes"], in_channels=card["in_channels"])
    model.load_state_dict(_perturbed_teacher(root))
    save_model(model, root / TEACHER, {k: v for k, v in card.items() if k not in ("sha256", "weights")})


def edit_teacher_weights(root: Path) -> None:
    save_file(_perturbed_teacher(root), str(root / TEACHER))  # the card still has the old sha256


def tear_checkpoints(root: Path) -> None:
    for path in (root / "runs/student").glob("epoch-*/model.safetensors"):
        path.write_bytes(path.read_bytes()[:100])


def chain(*steps: Mutate) -> Mutate:
    def mutate(root: Path) -> None:
        for step in steps:
            step(root)
    return mutate


# ---- the table -------------------------------------------------------------------------------

# (id, command, how the input is broken, fragments: the file or key, the reason, the fix)
CASES: list[tuple[str, list[str], Mutate, tuple[str, ...]]] = [
    ("shard-truncated", STUDENT, truncate("data/shards/train-00003.tar"),
     ("data/shards/train-00003.tar", "does not match the manifest's", "rerun `aekt prepare`")),
    ("shard-corrupted", EVALUATE, flip_byte("data/shards/test-00002.tar"),
     ("data/shards/test-00002.tar", "corrupt or was rewritten", "rerun `aekt prepare`")),
    ("shard-corrupted-while-resuming-cache", CACHE,
     chain(flip_byte("data/shards/train-00004.tar"), unmark(1, 4)),
     ("data/shards/train-00004.tar", "corrupt or was rewritten", "rerun `aekt prepare`")),
    ("shard-truncated-read-in-a-loader-worker", STUDENT,
     chain(truncate("data/shards/train-00003.tar"), params("train", "workers", 2)),
     ("data/shards/train-00003.tar", "does not match the manifest's", "rerun `aekt prepare`")),
    ("manifest-lists-missing-shard", STUDENT, delete("data/shards/train-00005.tar"),
     ("data/shards/train-00005.tar", "cannot read", "No such file", "rerun `aekt prepare`")),
    ("shard-missing-from-manifest-by-hand", STUDENT,
     edit_manifest(_drop_last_train_shard, rehash=False),
     (MANIFEST, "does not match its content", "edited by hand", "Rerun `aekt prepare`")),
    ("shard-missing-from-manifest-rehashed", STUDENT,
     edit_manifest(_drop_last_train_shard, rehash=True),
     (STORE, "manifest_sha256: store has", "num_samples: store has 300, inputs give 288",
      "`dvc repro cache`")),
    ("manifest-differs-from-cache", STUDENT, edit_manifest(_rename_class, rehash=True),
     (STORE, "does not match this run's inputs", "manifest_sha256: store has", "`dvc repro cache`")),
    ("manifest-differs-from-cache-plain-rerun", CACHE, edit_manifest(_rename_class, rehash=True),
     (STORE, "built from other inputs", "manifest_sha256: store has", "`aekt cache --rebuild`")),
    ("teacher-differs-from-cache", STUDENT, retrain_teacher,
     (STORE, "teacher_sha256: store has", "`dvc repro cache`")),
    ("teacher-differs-from-cache-plain-rerun", CACHE, retrain_teacher,
     (STORE, "built from other inputs", "teacher_sha256: store has", "`aekt cache --rebuild`")),
    ("teacher-weights-edited", CACHE, edit_teacher_weights,
     (TEACHER, "does not match its card", "`aekt teacher`")),
    ("teacher-weights-missing", CACHE, delete(TEACHER),
     (TEACHER, "weights file not found (its card exists)",)),
    ("teacher-card-missing", CACHE, delete("models/teacher.json"),
     ("models/teacher.json", "model card not found", "`aekt teacher`")),
    ("cache-other-class-count", STUDENT, store_built_with(num_classes=12),
     (STORE, "num_classes: store has 12, inputs give 10", "`dvc repro cache`")),
    ("cache-fewer-views", STUDENT, store_built_with(views=1),
     (STORE, "views: store has 1, inputs give 2", "`dvc repro cache`")),
    ("cache-unfinished", STUDENT, unmark(0, 7),
     (STORE, "1 of 38 (view, shard) rows are unfinished", "rerun `aekt cache`")),
    ("cache-missing", STUDENT, lambda root: shutil.rmtree(root / STORE),
     (STORE, "not a logit store", "`aekt cache`")),
    ("cache-nan-logit", STUDENT, poke_logits(1, 20, np.nan),
     (STORE, "non-finite logits for view 1, sample index 20", "delete it and rerun `aekt cache`")),
    ("cache-inf-logit", STUDENT, poke_logits(0, 250, np.inf),
     (STORE, "non-finite logits for view 0, sample index 250", "delete it and rerun `aekt cache`")),
    ("checkpoints-all-torn", RESUME, tear_checkpoints,
     ("runs/student", "every checkpoint is damaged", "run without --resume")),
    ("params-unknown-key", CACHE, params("cache", "codecs", "fp16"),
     ("params.yaml cache.codecs", "unknown key", "Did you mean 'codec'?", "Allowed keys")),
    ("params-unknown-section", STUDENT, params("trian", "epochs", 3),
     ("params.yaml", "unknown section 'trian'", "Did you mean 'train'?")),
    ("params-wrong-type", STUDENT, params("train", "epochs", "ten"),
     ("params.yaml train.epochs", "expected an integer, got 'ten'",)),
    ("params-out-of-range", CACHE, params("augment", "views", 0),
     ("params.yaml augment.views", "0 is below the minimum 1",)),
    ("params-not-a-choice", STUDENT, params("loss", "name", "kdd"),
     ("params.yaml loss.name", "'kdd' is not one of", "Did you mean 'kd'?")),
    ("params-nan", STUDENT, params("loss", "tau", float("nan")),
     ("params.yaml loss.tau", "nan is not a finite number")),
    ("params-inf-warmup", STUDENT, params("loss", "warmup_epochs", float("inf")),
     ("params.yaml loss.warmup_epochs", "inf is not a finite number")),
    ("params-huge-batch", STUDENT, params("train", "batch_size", 1_000_000_000),
     ("params.yaml train.batch_size", "is above the maximum")),
    ("params-huge-epochs", STUDENT, params("train", "epochs", 10**23),
     ("params.yaml train.epochs", "is above the maximum")),
    ("params-retired-recipe", STUDENT, params("train", "recipe", "cifar_240ep"),
     ("params.yaml train.recipe", "was removed", "presets/cifar10.yaml")),
    ("params-malformed-yaml", CACHE, raw_params(b"cache:\n  codec: [fp16\n"),
     ("params.yaml line", "not valid YAML", "git checkout -- params.yaml")),
    ("params-binary", EVALUATE, raw_params(bytes(range(256))),
     ("params.yaml", "not a UTF-8 text file", "git checkout -- params.yaml")),
    ("params-python-tag", STUDENT, raw_params(b"train: !!python/object/apply:os.system [touch pwned]\n"),
     ("params.yaml line 1", "no tags such as !!python", "Remove the tag")),
    ("params-non-string-key", STUDENT, raw_params(b"train:\n  1: 2\n"),
     ("params.yaml train", "key 1 is not a name")),
    ("params-scalar-section", STUDENT, raw_params(b"train: 5\n"),
     ("params.yaml train", "expected a mapping of keys to values, got int 5")),
    ("params-list-section", CACHE, raw_params(b"cache:\n  - fp16\n"),
     ("params.yaml cache", "expected a mapping of keys to values, got list")),
    ("params-list-file", CACHE, raw_params(b"- cache\n- train\n"),
     ("params.yaml", "expected a mapping of sections")),
]
if not torch.cuda.is_available():  # the case only exists on a machine without a GPU (CI's)
    CASES.append(("eval-device-cuda-without-gpu", EVALUATE, params("eval", "device", "cuda"),
                  ("params.yaml eval.device", "no CUDA device", "set params.yaml eval.device to auto")))

# ---- docs/errors.md drives the table --------------------------------------------------------

DOC = REPO / "docs/errors.md"


def doc_test_refs() -> list[list[str]]:
    """The `test` cell of every row of every table in docs/errors.md, as a list of references."""
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| message (gist)"):
            cell = re.split(r"(?<!\\)\|", line.strip())[-2]
            rows.append(re.findall(r"`([^`]+)`", cell))
    return rows


BY_ID = {c[0]: c[1:] for c in CASES}
DOC_CASES = [ref.split(":", 1)[1] for refs in doc_test_refs() for ref in refs if ref.startswith("errors:")]
DOC_CASES = list(dict.fromkeys(DOC_CASES))  # a case named by two rows runs once


def test_every_row_of_docs_errors_names_a_test_that_exists() -> None:
    rows = doc_test_refs()
    assert len(rows) > 50
    for refs in rows:
        assert refs, "a docs/errors.md row without a test"
        for ref in refs:
            if ref.startswith("errors:"):
                case = ref.split(":", 1)[1]
                gpu_only = case == "eval-device-cuda-without-gpu" and torch.cuda.is_available()
                assert case in BY_ID or gpu_only, f"docs/errors.md names case {case!r}, not in test_errors.py"
                continue
            module, _, name = ref.partition("::")
            assert (REPO / "tests" / module).is_file(), ref
            source = (REPO / "tests" / module).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, re.MULTILINE), f"{ref}: no such test"


def test_every_case_is_in_docs_errors() -> None:
    assert set(BY_ID) - set(DOC_CASES) == set(), "cases missing from docs/errors.md"


@pytest.mark.parametrize(("command", "mutate", "fragments"), [BY_ID[c] for c in DOC_CASES if c in BY_ID],
                         ids=[c for c in DOC_CASES if c in BY_ID])
def test_bad_input_gives_one_clear_paragraph_and_touches_no_output(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, request: pytest.FixtureRequest,
        command: list[str], mutate: Mutate, fragments: tuple[str, ...]) -> None:
    root = copy_pipeline(tmp_path_factory, tmp_path / "pipeline")
    mutate(root)
    # The inf logit sits in a later view: epoch 1 completes and writes the run's own first checkpoint,
    # which (by design) replaces the older run's; every other case fails before any checkpoint.
    skip = ("runs",) if request.node.callspec.id == "cache-inf-logit" else ()
    dirs = tuple(d for d in ("data", "manifests", "models", "cache", "metrics", "plots", "runs") if d not in skip)
    before = snapshot(root, dirs)
    message = user_error(aekt_inproc(command, root))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert snapshot(root, dirs) == before



def test_the_fix_named_for_a_corrupt_store_works(tmp_path_factory: pytest.TempPathFactory,
                                                 tmp_path: Path) -> None:
    # Its provenance still matches, so `aekt cache --rebuild` would keep the NaN; deleting works.
    root = copy_pipeline(tmp_path_factory, tmp_path / "pipeline")
    poke_logits(1, 20, np.nan)(root)
    assert aekt_inproc(COMMANDS["cache"], root).exit_code == 0
    assert np.isnan(zarr.open_array(str(root / STORE / "logits"))[1, 20, 3])
    shutil.rmtree(root / STORE)
    assert aekt_inproc(CACHE, root).exit_code == 0
    assert_same_store(root / STORE, built_pipeline(tmp_path_factory) / STORE)


def test_evaluate_with_loader_workers_gives_the_same_report(tmp_path_factory: pytest.TempPathFactory,
                                                             tmp_path: Path) -> None:
    """eval.workers decodes the test shards in DataLoader processes: same samples, same report."""
    root = copy_pipeline(tmp_path_factory, tmp_path / "pipeline")
    assert aekt_inproc(EVALUATE, root).exit_code == 0
    serial = json.loads((root / "metrics/eval.json").read_text())
    write_params(root, eval={"workers": 2})
    assert aekt_inproc(EVALUATE, root).exit_code == 0
    parallel = json.loads((root / "metrics/eval.json").read_text())
    assert parallel == serial and serial["num_samples"] > 0


def test_a_huge_eval_batch_gives_the_same_report_without_the_memory(tmp_path_factory: pytest.TempPathFactory,
                                                                     tmp_path: Path) -> None:
    """torch pre-allocates batch_size slots per batch of an IterableDataset: the loader caps the batch
    at the split's size, so eval.batch_size 1e8 (allowed) neither hangs nor allocates ~GBs."""
    import resource

    root = copy_pipeline(tmp_path_factory, tmp_path / "pipeline")
    assert aekt_inproc(EVALUATE, root).exit_code == 0
    reference = json.loads((root / "metrics/eval.json").read_text())
    write_params(root, eval={"batch_size": 100_000_000})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert aekt_inproc(EVALUATE, root).exit_code == 0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert json.loads((root / "metrics/eval.json").read_text()) == reference
    assert grown_mib < 400, f"peak memory grew by {grown_mib:.0f} MiB"
