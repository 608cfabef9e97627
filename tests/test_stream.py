"""Stage-2 streaming: every sample once per epoch across ranks and workers, with its stored view."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import augment
from pipeline.cache.store import LogitStore
from pipeline.data import Manifest, decode_image, read_shard
from pipeline.stream import ShardStream, StreamSpec, assign_shards, epoch_view, shard_order


def spec(root: Path, **kw) -> StreamSpec:
    base = dict(manifest_path=root / "manifest.json", shards_dir=root / "shards", split="train",
                recipe="digits", image_size=224, aug_seed=0, views=2, store_path=root / "store.zarr")
    return StreamSpec(**{**base, **kw})


@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_shard_assignment_is_a_partition(world: int, workers: int) -> None:
    order = shard_order(11, seed=0, epoch=3, shuffle=True)
    parts = [assign_shards(order, rank=r, world=world, worker=w, num_workers=workers)
             for r in range(world) for w in range(workers)]
    flat = [s for p in parts for s in p]
    assert sorted(flat) == list(range(11))
    assert shard_order(11, seed=0, epoch=3, shuffle=True) == order != shard_order(11, seed=0, epoch=4, shuffle=True)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (2, 2)])
def test_every_sample_once_per_epoch(tiny_pipeline: Path, world: int, workers: int) -> None:
    seen = []
    for rank in range(world):
        stream = ShardStream(spec(tiny_pipeline), epoch=1, rank=rank, world=world)
        for batch in DataLoader(stream, batch_size=16, num_workers=workers):
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(200))


def test_samples_carry_their_stored_view_and_logits(tiny_pipeline: Path) -> None:
    stream = ShardStream(spec(tiny_pipeline), epoch=3)
    store = LogitStore.open(tiny_pipeline / "store.zarr")
    manifest = Manifest.load(tiny_pipeline / "manifest.json")
    raw = {s.index: s for info in manifest.splits["train"].shards
           for s in read_shard(tiny_pipeline / "shards" / info.name)}
    items = list(stream)
    assert {it["view"] for it in items} == {1}  # cycle policy: epoch 3 of 2 views
    for it in items[:40]:
        idx = it["index"]
        shard = idx // 32
        logits, params = store.read_row(1, shard)
        row = idx - shard * 32
        np.testing.assert_array_equal(it["teacher"].numpy(), logits[row])
        original = decode_image(raw[idx].image, channels=1, name=str(idx))
        assert torch.equal(it["image"], augment.apply("digits", original, params[row]))


def test_without_a_store_the_generator_gives_the_same_pixels(tiny_pipeline: Path) -> None:
    cached = {it["index"]: it["image"] for it in ShardStream(spec(tiny_pipeline), epoch=2)}
    online = {it["index"]: it["image"] for it in ShardStream(spec(tiny_pipeline, store_path=None), epoch=2)}
    assert cached.keys() == online.keys()
    assert all(torch.equal(cached[i], online[i]) for i in cached)


def test_random_view_policy_is_seeded_and_in_range(tiny_pipeline: Path) -> None:
    s = spec(tiny_pipeline, view_policy="random", views=8)
    views = [epoch_view(s, e, shard) for e in range(20) for shard in range(7)]
    assert set(views) <= set(range(8)) and len(set(views)) > 4
    assert views == [epoch_view(s, e, shard) for e in range(20) for shard in range(7)]


def test_eval_split_is_in_manifest_order_without_augmentation(tiny_pipeline: Path) -> None:
    items = list(ShardStream(spec(tiny_pipeline, split="test", train=False, store_path=None)))
    assert [it["index"] for it in items] == list(range(len(items)))
    assert all(it["teacher"].numel() == 0 for it in items)


def test_batch_augmentation_gives_the_same_pixels_as_per_sample(tiny_pipeline: Path) -> None:
    per_sample = {it["index"]: it["image"] for it in ShardStream(spec(tiny_pipeline), epoch=1)}
    loader = DataLoader(ShardStream(spec(tiny_pipeline, batch_augment=True), epoch=1), batch_size=50)
    for batch in loader:
        assert batch["params"].shape == (len(batch["index"]), 2)
        images = augment.apply_batch("digits", batch["image"], batch["params"])
        for i, idx in enumerate(batch["index"].tolist()):
            assert torch.equal(images[i], per_sample[idx])
