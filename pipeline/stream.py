"""Stage-2 streaming reader: shards (+ the cached logits of one view) -> augmented samples.

Each epoch the shard order is permuted with a generator seeded by (seed, epoch); rank r takes
shards r, r+W, ... and DataLoader worker k of that rank takes every num_workers-th of those, so no
sample is seen twice per epoch and none is skipped (ranks may get a different number of samples;
the trainer joins uneven inputs, see ``train.py``). Within a shard samples are shuffled in memory.

For every shard the view ``v`` of this epoch is chosen (cycle: e mod V; random: seeded per
(epoch, shard)), the shard's logits chunk row and augmentation parameters are read from the store
once, and each image gets exactly the stored parameters, through the same ``augment.apply`` that
stage 1 used. Without a store (teacher training, online KD) the parameters come from the same pure
(seed, view, index) generator, so cached and online runs see identical pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import augment
from pipeline.cache.store import CacheError, LogitStore
from pipeline.data import Manifest, decode_image
from pipeline.data.location import Location


@dataclass(frozen=True)
class StreamSpec:
    manifest_path: Path
    shards_dir: Location
    split: str
    recipe: str
    image_size: int
    aug_seed: int
    views: int  # number of distinct views (store's V, or the generator's period without a store)
    train: bool = True  # False: deterministic eval transform, manifest order, no logits
    seed: int = 0  # shuffling seed
    view_policy: str = "cycle"
    store_path: Location | None = None
    # Fixed-size recipes: yield the decoded image with its params and let the trainer augment the
    # whole batch on its device (augment.apply_batch, the function apply() itself calls), instead of
    # ~10 small tensor ops per sample in the workers.
    batch_augment: bool = False


def epoch_view(spec: StreamSpec, epoch: int, shard: int) -> int:
    if spec.view_policy == "cycle":
        return epoch % spec.views
    rng = np.random.default_rng([spec.seed, epoch, shard, 0x5EED])
    return int(rng.integers(spec.views))


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return [int(s) for s in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def assign_shards(order: list[int], *, rank: int, world: int, worker: int, num_workers: int) -> list[int]:
    """Disjoint shard subsets per (rank, worker); their union is ``order``."""
    return order[rank::world][worker::num_workers]


class ShardStream(IterableDataset):
    """Yields dicts: image (uint8 [C, h, w]), label, index, view, teacher (float32 [C] or empty),
    params (float32 [P] still to apply with ``augment.apply_batch`` when ``batch_augment``, else empty)."""

    def __init__(self, spec: StreamSpec, *, epoch: int = 0, rank: int = 0, world: int = 1):
        self.spec, self.epoch, self.rank, self.world = spec, epoch, rank, world
        self.manifest = Manifest.load(spec.manifest_path)
        self._store: LogitStore | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def store(self) -> LogitStore | None:
        # Opened lazily in each worker: zarr handles are cheap and are not shared across forks.
        if self._store is None and self.spec.store_path is not None:
            self._store = LogitStore.open(self.spec.store_path)
        return self._store

    def my_shards(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        n = len(self.manifest.splits[self.spec.split].shards)
        order = shard_order(n, seed=self.spec.seed, epoch=self.epoch, shuffle=self.spec.train)
        return assign_shards(order, rank=self.rank, world=self.world, worker=worker,
                             num_workers=num_workers)

    def num_samples(self) -> int:
        """Samples this rank yields per epoch (all workers together)."""
        shards = self.manifest.splits[self.spec.split].shards
        return sum(shards[s].count for s in self.my_shards())

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for shard in self.my_shards(worker, num_workers):
            yield from self._shard_samples(shard)

    def _shard_samples(self, shard: int) -> Iterator[dict]:
        spec, manifest = self.spec, self.manifest
        info = manifest.splits[spec.split].shards[shard]
        samples = manifest.read_shard(spec.shards_dir, spec.split, shard)  # labels < num_classes
        labels = np.array([s.label for s in samples])
        indices = np.array([s.index for s in samples])
        view = epoch_view(spec, self.epoch, shard) if spec.train else -1
        teacher = np.zeros((len(samples), 0), dtype=np.float32)
        if spec.train and self.store is not None:
            teacher, params = self.store.read_row(view, shard, labels)
            if teacher.shape[0] != len(samples):
                raise CacheError(f"{spec.store_path}: shard {info.name} has {len(samples)} samples "
                                 f"but the store row holds {teacher.shape[0]}; delete the store and rerun "
                                 "`aekt cache` (or `dvc repro cache`).")
        elif spec.train:
            params = augment.sample_params(spec.recipe, seed=spec.aug_seed, view=view, indices=indices)
        order = (np.random.default_rng([spec.seed, self.epoch, shard, 1]).permutation(len(samples))
                 if spec.train else np.arange(len(samples)))
        deferred = spec.train and spec.batch_augment and augment.recipe_info(spec.recipe).fixed_size
        no_params = torch.zeros(0)
        for i in order:
            s = samples[i]
            image = decode_image(s.image, channels=manifest.channels, name=f"{info.name}:{s.key}")
            if deferred:
                pending = torch.from_numpy(np.asarray(params[i], dtype=np.float32))
            elif spec.train:
                image, pending = augment.apply(spec.recipe, image, params[i], size=spec.image_size), no_params
            else:
                image, pending = augment.eval_transform(spec.recipe, image, size=spec.image_size), no_params
            yield {"image": image, "label": int(s.label), "index": int(s.index), "view": view,
                   "teacher": torch.from_numpy(teacher[i]), "params": pending}
