"""Stage 1: the Zarr store matches a fresh teacher on replayed views, resumes, and splits work."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.artifacts import read_card
from pipeline.cache.build import expected_provenance
from pipeline.cache.store import CacheError, LogitStore
from pipeline.cache.verify import verify_cache
from pipeline.cache.writer import open_or_create, pending_items, split_items, worker_items
from pipeline.config import load_params, section
from pipeline.data import Manifest
from tests.conftest import free_port, run

AEKT = [sys.executable, "-m", "stages.cli"]


def cfgs(root: Path):
    params = load_params(root / "params.yaml")
    return section(params, "cache"), section(params, "augment")


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    store = LogitStore.open(path)
    return {name: store.group[name][:] for name in store.group.array_keys()}


def rerun_gives(work: Path, expected: dict[str, np.ndarray], written: int) -> None:
    """`aekt cache` again: it writes ``written`` rows and leaves the store equal to ``expected``."""
    out = run([*AEKT, "cache", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher",
               "teacher.safetensors", "--store", "store.zarr", "--no-progress"], work).stdout
    assert f"{written} of 14 (view, shard) items written" in out
    got = store_arrays(work / "store.zarr")
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_decoded_logits_equal_a_fresh_teacher_on_the_replayed_view(tiny_any: Path) -> None:
    cache, aug = cfgs(tiny_any)
    report = verify_cache(store_path=tiny_any / "store.zarr", manifest_path=tiny_any / "manifest.json",
                          shards_dir=tiny_any / "shards", teacher_path=tiny_any / "teacher.safetensors",
                          cfg=cache, aug=aug, samples=200)
    assert report["ok"] and report["params_replayable"]
    assert report["rows_done"] == report["rows_total"] == 2 * 7
    assert report["max_abs_logit_error"] < 1e-4  # fp32 codec; only batch-composition rounding differs
    assert report["kl_tau1_max"] < 1e-9


def test_store_layout_one_chunk_row_per_view_and_shard(tiny_pipeline: Path) -> None:
    store = LogitStore.open(tiny_pipeline / "store.zarr")
    prov = store.provenance
    assert (prov.views, prov.num_samples, prov.shard_size, prov.num_classes) == (2, 200, 32, 10)
    chunk_files = sorted((tiny_pipeline / "store.zarr" / "logits" / "c").rglob("*"))
    assert len([f for f in chunk_files if f.is_file()]) == prov.views * prov.num_shards
    manifest = Manifest.load(tiny_pipeline / "manifest.json")
    assert prov.manifest_sha256 == manifest.sha256
    assert prov.teacher_sha256 == read_card(tiny_pipeline / "teacher.safetensors")["sha256"]


def test_cli_verify_reports_and_exits_zero(tiny_pipeline: Path) -> None:
    out = run([*AEKT, "verify-cache", "--store", "store.zarr", "--manifest", "manifest.json", "--shards-dir",
               "shards", "--teacher", "teacher.safetensors", "--samples", "32"], tiny_pipeline).stdout
    assert "params replayable: True" in out and "B/sample-view on disk" in out


def test_a_store_from_other_inputs_is_refused_or_rebuilt(tiny_pipeline: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store.zarr"
    shutil.copytree(tiny_pipeline / "store.zarr", store_path)
    cache, aug = cfgs(tiny_pipeline)
    manifest = Manifest.load(tiny_pipeline / "manifest.json")
    prov = expected_provenance(manifest, read_card(tiny_pipeline / "teacher.safetensors"), cache, aug)
    other = replace(prov, teacher_sha256="0" * 64)
    with pytest.raises(CacheError, match=r"teacher_sha256.*aekt cache --rebuild"):
        open_or_create(store_path, other, cache, rebuild=False)
    rebuilt = open_or_create(store_path, other, cache, rebuild=True)
    assert not rebuilt.done_mask().any() and rebuilt.provenance.teacher_sha256 == "0" * 64


def test_rerun_redoes_only_unfinished_rows_and_gives_the_same_store(tiny_any: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(tiny_any, work)
    expected = store_arrays(work / "store.zarr")
    store = LogitStore.open(work / "store.zarr", mode="r+")
    store.group["done"][1, 3] = 0
    store.group["logits"][1, 96:128] = np.nan  # a half-written chunk row without its marker
    rerun_gives(work, expected, written=1)


def test_two_processes_write_the_same_store_as_one(tiny_any: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    for name in ("params.yaml", "manifest.json", "teacher.safetensors", "teacher.json"):
        shutil.copy2(tiny_any / name, work / name)
    shutil.copytree(tiny_any / "shards", work / "shards")
    proc = run(["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "-m", "stages.cli", "cache",
                "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher", "teacher.safetensors",
                "--store", "store.zarr", "--no-progress"], work)
    assert "8 mine" in proc.stderr and "6 mine" in proc.stderr  # whole shards: 4 + 3 of 7, x 2 views
    expected, got = store_arrays(tiny_any / "store.zarr"), store_arrays(work / "store.zarr")
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)


@pytest.mark.parametrize(("world", "workers"), [(2, 2), (16, 8), (3, 2), (1, 4)])
def test_every_decode_worker_of_every_rank_gets_whole_shards(world: int, workers: int) -> None:
    """A rank's shards all have s mod world = rank: split by shard index again, workers sharing a
    factor with the world size got nothing (with 2 ranks and cache.workers 2, one decoder per rank)."""
    items = [(v, s) for v in range(2) for s in range(world * workers * 3)]
    for rank in range(world):
        mine = split_items(items, rank, world)
        parts = [worker_items(mine, w, workers) for w in range(workers)]
        assert sorted(item for part in parts for item in part) == sorted(mine)
        shard_sets = [{s for _, s in part} for part in parts]
        assert all(len(shards) == 3 for shards in shard_sets)  # an equal share of whole shards each
        assert len(set().union(*shard_sets)) == 3 * workers


def test_stage1_and_verify_normalise_for_the_teacher_its_card_names(tiny_pipeline: Path, tmp_path: Path) -> None:
    """A teacher's input normalisation belongs to the teacher: stage 1 and verify-cache feed it the
    replayed view normalised with its card's statistics (an imported teacher's differ from the
    recipe's), and the store records them, so a store cached under other statistics is refused."""
    import json

    import torch

    from pipeline import augment
    from pipeline.artifacts import card_path, load_model
    from pipeline.cache.writer import ShardSource

    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline, work)
    card_file = card_path(work / "teacher.safetensors")
    card = json.loads(card_file.read_text())
    own = augment.Normalization((0.5,), (0.25,))  # not the digits recipe's (0.3053, 0.3760)
    card_file.write_text(json.dumps({**card, "input_norm": own.to_dict()}))
    cache, aug = cfgs(work)
    manifest = Manifest.load(work / "manifest.json")
    stale = LogitStore.open(work / "store.zarr").provenance
    with pytest.raises(CacheError, match="teacher_input_norm"):
        open_or_create(work / "store.zarr", replace(stale, teacher_input_norm=own.to_dict()), cache, rebuild=False)
    run([*AEKT, "cache", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher",
         "teacher.safetensors", "--store", "store.zarr", "--rebuild", "--no-progress"], work)
    store = LogitStore.open(work / "store.zarr")
    assert store.provenance.teacher_input_norm == own.to_dict()
    keys, images, labels, indices = ShardSource(manifest, work / "shards").load(2)
    stored, params = store.read_row(1, 2, labels)
    views = augment.apply_views("digits", images, params)
    teacher, _ = load_model(work / "teacher.safetensors")
    with torch.no_grad():
        fresh = teacher.eval()(own(views)).numpy()
        recipe_normalised = teacher(augment.normalize(views, "digits")).numpy()
    np.testing.assert_allclose(stored, fresh, atol=1e-4)
    assert np.abs(stored - recipe_normalised).max() > 0.1
    report = verify_cache(store_path=work / "store.zarr", manifest_path=work / "manifest.json",
                          shards_dir=work / "shards", teacher_path=work / "teacher.safetensors",
                          cfg=cache, aug=aug, samples=32)
    assert report["ok"] and report["kl_tau1_max"] < 1e-9


def _shard_labels(root: Path) -> list[np.ndarray]:
    manifest = Manifest.load(root / "manifest.json")
    return [np.array([s.label for s in manifest.read_shard(root / "shards", "train", i)])
            for i in range(len(manifest.splits["train"].shards))]


def test_store_holds_every_training_label_as_the_shards_give_it(tiny_pipeline: Path) -> None:
    store = LogitStore.open(tiny_pipeline / "store.zarr")
    expected = _shard_labels(tiny_pipeline)
    assert store.group.attrs["schema_version"] == 2 and store.has_labels
    np.testing.assert_array_equal(store.group["labels"][:], np.concatenate(expected))
    for shard, labels in enumerate(expected):
        np.testing.assert_array_equal(store.read_labels(shard), labels)
    chunks = [f for f in (tiny_pipeline / "store.zarr" / "labels" / "c").rglob("*") if f.is_file()]
    assert len(chunks) == store.provenance.num_shards  # one chunk per shard, like a chunk row


def test_a_missing_labels_chunk_is_rewritten_by_a_rerun(tiny_pipeline: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline, work)
    expected = store_arrays(work / "store.zarr")
    (work / "store.zarr" / "labels" / "c" / "3").unlink()
    store = LogitStore.open(work / "store.zarr", mode="r+")
    assert store.read_labels(3) is None and store.done_mask().all()  # readers fall back to the shard
    assert pending_items(store) == [(0, 3), (1, 3)]  # the rows it should have preceded are redone
    rerun_gives(work, expected, written=2)


def make_schema1(store_path: Path) -> None:
    """Turn a store into one written before labels were stored: no labels array, schema_version 1."""
    shutil.rmtree(store_path / "labels")
    group = zarr.open_group(str(store_path), mode="r+")
    group.attrs["schema_version"] = 1


def test_a_schema1_store_without_labels_still_opens_and_resumes(tiny_pipeline: Path, tmp_path: Path) -> None:
    store_path = tmp_path / "store.zarr"
    shutil.copytree(tiny_pipeline / "store.zarr", store_path)
    make_schema1(store_path)
    store = LogitStore.open(store_path, mode="r+")
    assert not store.has_labels and store.read_labels(0) is None and store.done_mask().all()
    assert pending_items(store) == []  # a finished schema-1 store is complete, not damaged
    cache, aug = cfgs(tiny_pipeline)
    prov = expected_provenance(Manifest.load(tiny_pipeline / "manifest.json"),
                               read_card(tiny_pipeline / "teacher.safetensors"), cache, aug)
    assert open_or_create(store_path, prov, cache, rebuild=False).provenance == store.provenance


def test_a_bf16_store_verifies_within_the_stated_precision_gap(tiny_pipeline: Path, tmp_path: Path) -> None:
    """verify-cache recomputes in fp32: a store built under bf16 autocast is judged with the codec's
    bound plus bf16's measured gap, and fails with the codec's bound alone (the gap is real)."""
    from pipeline.cache.verify import KL_TOLERANCE, PRECISION_KL_TOLERANCE

    work = tmp_path / "w"
    shutil.copytree(tiny_pipeline, work, ignore=shutil.ignore_patterns("store.zarr"))
    params = (work / "params.yaml").read_text().replace("cache: {", "cache: {mixed_precision: bf16, ")
    (work / "params.yaml").write_text(params)
    run([*AEKT, "cache", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher",
         "teacher.safetensors", "--store", "store.zarr", "--no-progress"], work)
    cache, aug = cfgs(work)
    kw = dict(store_path=work / "store.zarr", manifest_path=work / "manifest.json", shards_dir=work / "shards",
              teacher_path=work / "teacher.safetensors", cfg=cache, aug=aug, samples=200)
    report = verify_cache(**kw)
    assert report["ok"], report["failures"]
    assert report["kl_tolerance"] == KL_TOLERANCE["fp32"] + PRECISION_KL_TOLERANCE["bf16"]
    assert KL_TOLERANCE["fp32"] < report["kl_tau1_max"] < PRECISION_KL_TOLERANCE["bf16"]
    strict = verify_cache(**kw, tolerance=KL_TOLERANCE["fp32"])
    assert not strict["ok"] and "mixed_precision=bf16" in strict["failures"][0]
