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

Training and evaluation read whole batches (``ShardStream.batched``): a shard is decoded into one
uint8 tensor (raw ``.npy`` shards: one copy, no decode), its labels, indices, logits and params are
tensors, and batches are slices of those, so no per-sample Python dict or collate is on the path.
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
from pipeline.data import Manifest
from pipeline.data.images import decode_stack
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
    # augment.decode: "device" leaves encoded (JPEG/PNG) images undecoded in the workers; the trainer
    # decodes and augments each batch on its device (``batch_images``). Raw shards ignore it.
    decode: str = "pil"


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


# Rows decoded at a time for recipes that change the image size (imagenet): bounds a worker's memory.
DECODE_CHUNK = 64


class ShardStream(IterableDataset):
    """Yields per-sample dicts: image (uint8 [C, h, w]), label, index, view, teacher (float32 [C] or
    empty), params (float32 [P] still to apply with ``augment.apply_batch`` when ``batch_augment``,
    else empty). ``batched(b)`` gives the same rows as whole batches (what the trainer reads)."""

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
        """Per-sample dicts (the reference path; training and evaluation read ``batched``)."""
        for t in self._my_shard_tensors():
            for i in range(len(t.label)):
                yield {"image": t.image[i], "label": int(t.label[i]), "index": int(t.index[i]),
                       "view": int(t.view[i]), "teacher": t.teacher[i], "params": t.params[i]}

    def batched(self, batch_size: int) -> BatchStream:
        """Whole batches of ``batch_size`` (see ``BatchStream``)."""
        return BatchStream(self, batch_size)

    def _my_shard_tensors(self) -> Iterator[ShardTensors]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for shard in self.my_shards(worker, num_workers):
            yield from self.shard_tensors(shard)

    def shard_tensors(self, shard: int) -> Iterator[ShardTensors]:
        """One shard as tensors, rows in the order the stream yields them (shuffled for training):
        one piece for fixed-size recipes, pieces of ``DECODE_CHUNK`` rows for the imagenet recipe
        (a whole shard of decoded full-size JPEGs would not fit in a worker's memory)."""
        spec, manifest = self.spec, self.manifest
        info = manifest.splits[spec.split].shards[shard]
        samples = manifest.read_shard(spec.shards_dir, spec.split, shard)  # labels < num_classes
        n = len(samples)
        labels = np.array([s.label for s in samples], dtype=np.int64)
        indices = np.array([s.index for s in samples], dtype=np.int64)
        view = epoch_view(spec, self.epoch, shard) if spec.train else -1
        teacher = np.zeros((n, 0), dtype=np.float32)
        params = np.zeros((n, 0), dtype=np.float32)
        if spec.train and self.store is not None:
            teacher, params = self.store.read_row(view, shard, labels)
            if teacher.shape[0] != n:
                raise CacheError(f"{spec.store_path}: shard {info.name} has {n} samples but the store row "
                                 f"holds {teacher.shape[0]}; delete the store and rerun `aekt cache` (or "
                                 "`dvc repro cache`).")
        elif spec.train:
            params = augment.sample_params(spec.recipe, seed=spec.aug_seed, view=view, indices=indices)
        order = (np.random.default_rng([spec.seed, self.epoch, shard, 1]).permutation(n)
                 if spec.train else np.arange(n))
        fixed = augment.recipe_info(spec.recipe).fixed_size
        on_device = spec.decode == "device" and manifest.image_format != "raw"
        deferred = spec.train and (on_device or (spec.batch_augment and fixed))
        step = n if fixed or on_device else DECODE_CHUNK
        for lo in range(0, n, step):
            rows = order[lo:lo + step]
            images: torch.Tensor | list = [samples[i].image for i in rows]  # still encoded: on_device
            if not on_device:
                images = decode_stack(images, channels=manifest.channels,
                                      names=[f"{info.name}:{samples[i].key}" for i in rows])
            p = torch.from_numpy(np.array(params[rows], dtype=np.float32))
            if not deferred:
                images = images if on_device else self._transform(images, p)
                p = torch.zeros((len(rows), 0))
            yield ShardTensors(image=images, label=torch.from_numpy(labels[rows]),
                               index=torch.from_numpy(indices[rows]),
                               view=torch.full((len(rows),), view, dtype=torch.int64),
                               teacher=torch.from_numpy(np.array(teacher[rows], dtype=np.float32)), params=p)

    def _transform(self, images: torch.Tensor | list[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
        """Stored/sampled params applied (training) or the eval transform, here in the worker."""
        spec = self.spec
        if spec.train:
            return augment.apply_views(spec.recipe, images, params, size=spec.image_size)
        return augment.eval_views(spec.recipe, images, size=spec.image_size)


@dataclass
class ShardTensors:
    """Rows of one shard (or of a batch): uint8 images [n, C, h, w] (or the n encoded images, a list of
    bytes, for augment.decode: device), int64 label/index/view, float32 teacher logits [n, K] (K = 0
    without a store) and params still to apply [n, P] (P = 0 when applied)."""

    image: torch.Tensor | list
    label: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor
    teacher: torch.Tensor
    params: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: slice) -> ShardTensors:
        return ShardTensors(**{k: v[rows] for k, v in vars(self).items()})

    @staticmethod
    def cat(parts: list[ShardTensors]) -> ShardTensors:
        if len(parts) == 1:
            return parts[0]
        return ShardTensors(**{k: _cat([vars(p)[k] for p in parts]) for k in vars(parts[0])})


def _cat(values: list) -> torch.Tensor | list:
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [x for v in values for x in v]


def batch_images(batch: dict, spec: StreamSpec, *, channels: int, device: torch.device) -> torch.Tensor:
    """A batch's uint8 images [B, C, h, w] on ``device``, ready for the model's normalisation: encoded
    images (augment.decode: device) decoded and augmented there with the batch's params (the
    test-time view for an eval stream), or deferred params (batch_augment) applied there."""
    params = batch.get("params")
    if isinstance(batch["image"], list):
        from pipeline.device_decode import decode_and_augment

        return decode_and_augment(batch["image"], params if spec.train else None, path="device",
                                  channels=channels, size=spec.image_size, device=device,
                                  names=[f"sample {i}" for i in batch["index"].tolist()], recipe=spec.recipe)
    images = batch["image"].to(device, non_blocking=True)
    if params is not None and params.numel():
        images = augment.apply_batch(spec.recipe, images, params.to(device, non_blocking=True))
    return images


class BatchStream(IterableDataset):
    """A ShardStream as whole batches: each shard becomes tensors once, and batches are cut from the
    worker's run of shards exactly as the DataLoader would collate its per-sample dicts (batches
    cross shard boundaries; the worker's last batch may be short). So the batches, and training,
    are identical to the per-sample path, without a Python dict and a collate per sample. Use it
    with ``DataLoader(batch_size=None)``."""

    def __init__(self, stream: ShardStream, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[ShardTensors] = []
        have, b = 0, self.batch_size
        for shard in self.stream._my_shard_tensors():
            pending.append(shard)
            have += len(shard)
            while have >= b:
                rows = ShardTensors.cat(pending)
                yield _as_batch(rows.take(slice(0, b)))
                rest = rows.take(slice(b, None))
                pending, have = ([rest] if len(rest) else []), have - b
        if have:
            yield _as_batch(ShardTensors.cat(pending))


def _as_batch(rows: ShardTensors) -> dict[str, torch.Tensor]:
    # Views, not copies (a copy per batch cost as much as reading the shard): a DataLoader worker
    # moves a shard's storage to shared memory once, with its first batch, and the later batches
    # of that shard travel as views of it; pin_memory copies only the batch's own rows.
    return dict(vars(rows))
