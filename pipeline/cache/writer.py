"""Stage 1: run the teacher once over V augmented views of every training sample.

Work items are (view, shard) pairs; each is one chunk row of the store, so items are independent:
processes take items round-robin, a restarted run skips items whose done marker is set, and the
result does not depend on how the items were split (batches never cross a shard).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import augment
from pipeline.cache.store import CacheError, LogitStore, Provenance
from pipeline.cache.store_folder import holds_store, refuse_to_replace
from pipeline.config import AugmentConfig, CacheConfig
from pipeline.data import Manifest
from pipeline.data.images import decode_stack
from pipeline.data.location import Location, filesystem, is_object_store
from pipeline.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSource:
    """Where a split's shards live and how to decode them."""

    manifest: Manifest
    shards_dir: Location  # a local folder or a URL
    split: str = "train"

    def load(self, shard: int, *, decode: bool = True
             ) -> tuple[list[str], torch.Tensor | list[torch.Tensor] | list[bytes], np.ndarray, np.ndarray]:
        """(keys, images, labels, indices) of one shard, checked against the manifest (sha256, labels
        within its classes, indices); ``decode=False`` leaves the images encoded (augment.decode:
        device decodes them on the teacher's device)."""
        info = self.manifest.splits[self.split].shards[shard]
        samples = self.manifest.read_shard(self.shards_dir, self.split, shard)
        images: torch.Tensor | list = [s.image for s in samples]
        if decode:  # one uint8 tensor when the images share a size (raw shards: one copy, no decode)
            images = decode_stack(images, channels=self.manifest.channels,
                                  names=[f"{info.name}:{s.key}" for s in samples])
        return ([s.key for s in samples], images, np.array([s.label for s in samples]),
                np.array([s.index for s in samples]))


def split_items(items: list[tuple[int, int]], part: int, parts: int) -> list[tuple[int, int]]:
    """The (view, shard) items of ``part`` of ``parts``: whole shards, so each shard is read and
    decoded once for all its pending views (decoding, not the teacher, dominates stage 1 on CPU)."""
    return [(v, s) for v, s in items if s % parts == part]


def worker_items(items: list[tuple[int, int]], worker: int, num_workers: int) -> list[tuple[int, int]]:
    """A DataLoader worker's share of one rank's items: whole shards, dealt out by their position
    among the rank's shards. (Not by shard index: a rank's shards all have s mod world = rank, so
    ``s mod num_workers`` left workers idle whenever the two counts share a factor — 1 busy
    decoder of 8 with 16 ranks.)"""
    shards = set(sorted({s for _, s in items})[worker::num_workers])
    return [(v, s) for v, s in items if s in shards]


class _ViewItems(IterableDataset):
    """Decode each shard once, then augment it for each pending view; split across DataLoader workers."""

    def __init__(self, source: ShardSource, items: list[tuple[int, int]], aug: AugmentConfig):
        self.source, self.items, self.aug = source, items, aug

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.items if info is None else worker_items(self.items, info.id, info.num_workers)
        views_of: dict[int, list[int]] = {}
        for view, shard in mine:
            views_of.setdefault(shard, []).append(view)
        on_device = self.aug.decode == "device" and self.source.manifest.image_format != "raw"
        for shard, views in views_of.items():
            keys, images, labels, indices = self.source.load(shard, decode=not on_device)
            for view in views:
                params = augment.sample_params(self.aug.recipe, seed=self.aug.seed, view=view, indices=indices)
                item = {"view": view, "shard": shard, "keys": keys, "labels": labels, "params": params}
                if on_device:  # decoded and augmented on the teacher's device by write_items
                    yield item | {"encoded": images}
                else:
                    yield item | {"images": augment.apply_views(self.aug.recipe, images, params, size=self.aug.size)}


@contextmanager
def store_lock(path: Location) -> Iterator[None]:
    """Exclusive lock beside the store: a second `aekt cache` on the same store refuses to start.

    The lock file is opened without truncating and without following a link, so whatever sits at
    ``<store>.lock`` is never modified, and anything but a plain file there is refused. On an object
    store, which has no file locks, the lock is a lease object (``object_lease``)."""
    if is_object_store(path):
        with object_lease(f"{path}.lock", store=str(path)):
            yield
        return
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fix = ("`aekt cache` keeps its lock file at this path, beside the store; move it away (it is not "
           "deleted) and rerun `aekt cache`")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        kinds = {errno.EISDIR: "a folder", errno.ELOOP: "a symbolic link", errno.ENXIO: "a socket"}
        if err.errno not in kinds:
            raise
        raise CacheError(f"{lock_path}: is {kinds[err.errno]}, not a lock file; {fix}.") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CacheError(f"{lock_path}: is not a plain file, not a lock file; {fix}.")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise CacheError(f"{path}: another `aekt cache` is writing this store (lock {lock_path} is "
                             "held). Wait for it to finish; stage 1 resumes where it stops.") from err
        yield


# An object-store lease lasts LEASE_SECONDS and is renewed every third of that while stage 1 runs; a
# lease that has expired (its holder was killed or lost the network) may be taken over.
LEASE_SECONDS = float(os.environ.get("AEKT_LEASE_SECONDS", "60"))


def _lease_body(owner: str) -> bytes:
    return json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "expires": time.time() + LEASE_SECONDS}).encode()


def _stale(doc: dict) -> bool:
    """A lease nobody holds any more: expired, or taken on this host by a process that is gone."""
    if not isinstance(doc, dict) or not isinstance(doc.get("expires"), int | float):
        return True  # damaged: a lease we wrote is always readable
    if doc["expires"] < time.time():
        return True
    if doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        try:
            os.kill(doc["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _take_lease(fs: object, key: str, owner: str, url: str, store: str) -> None:
    """Create the lease object only if there is none (a conditional PUT), taking over a stale one."""
    for attempt in range(2):
        try:
            fs.pipe_file(key, _lease_body(owner), mode="create")  # type: ignore[attr-defined]
            return
        except FileExistsError:
            try:
                doc = json.loads(fs.cat_file(key))  # type: ignore[attr-defined]
            except FileNotFoundError:
                continue  # released meanwhile
            except ValueError:
                doc = None
            if attempt or not _stale(doc):
                held = f"held by {doc.get('host')} pid {doc.get('pid')}" if isinstance(doc, dict) else "held"
                raise CacheError(f"{store}: another `aekt cache` is writing this store (lease {url} is {held}, "
                                 f"renewed every {LEASE_SECONDS / 3:.0f} s). Wait for it to finish; stage 1 resumes "
                                 f"where it stops. A lease left by a killed run expires {LEASE_SECONDS:.0f} s after "
                                 "its last renewal (at once on the same host).") from None
            log.warning("%s: taking over a stale lease (%s)", url, doc)
            fs.rm_file(key)  # type: ignore[attr-defined]


@contextmanager
def object_lease(url: str, *, store: str) -> Iterator[None]:
    """An exclusive lease object at ``url``: created with a conditional PUT (If-None-Match), renewed
    by a thread while held, deleted on exit. A renewal that finds another owner stops the run."""
    fs, key = filesystem(url)
    owner = uuid.uuid4().hex
    _take_lease(fs, key, owner, url, store)
    stop, lost = threading.Event(), threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                if json.loads(fs.cat_file(key)).get("owner") != owner:
                    lost.set()
                    return
                fs.pipe_file(key, _lease_body(owner))
            except (OSError, ValueError) as err:  # a network hiccup: try again at the next renewal
                log.warning("%s: could not renew the lease (%s)", url, err)

    thread = threading.Thread(target=renew, name="aekt-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if not lost.is_set():
            with suppress(FileNotFoundError):
                fs.rm_file(key)
    if lost.is_set():
        raise CacheError(f"{store}: another run took over this store's lease ({url}) while this one wrote it; "
                         "rerun `aekt cache` once the other run has finished (it resumes).")


def open_or_create(path: Location, prov: Provenance, cfg: CacheConfig, *, rebuild: bool) -> LogitStore:
    """Reuse a store built from the same inputs (resume), else rebuild it or refuse. Only a folder
    that is a logit store is ever replaced (``refuse_to_replace``)."""
    refuse_to_replace(path, quick=True)
    if holds_store(path):  # an empty folder (e.g. made by hand) is no store yet
        try:
            store = LogitStore.open(path, mode="r+")
            diff = store.provenance.mismatches(prov)
        except CacheError as err:
            diff = [str(err)]
        if not diff:
            return store
        if not rebuild:
            raise CacheError(f"{path}: built from other inputs — " + "; ".join(diff) +
                             ". Rebuild it with `aekt cache --rebuild` (or delete the store).")
        log.warning("%s: inputs changed (%s); rebuilding the store", path, "; ".join(diff))
    return LogitStore.create(path, prov, compressor=cfg.compressor, clevel=cfg.clevel)


def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, norm: augment.Normalization, *,
                   batch_size: int, device: torch.device, mixed_precision: str) -> np.ndarray:
    """uint8 [n, C, H, W] -> float32 [n, classes], in batches that never cross a shard; ``norm`` is
    the teacher's own input normalisation (its card's)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    out = []
    with torch.inference_mode(), autocast:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            x = norm(batch)
            if x.is_cuda:  # channels_last: convolutions on tensor cores without transposes
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(teacher(x).float().cpu())
    return torch.cat(out).numpy()


def device_view_logits(teacher: torch.nn.Module, item: dict, norm: augment.Normalization, aug: AugmentConfig, *,
                       channels: int, batch_size: int, device: torch.device, mixed_precision: str) -> np.ndarray:
    """augment.decode: device: each batch of the item's encoded images is decoded and augmented with
    its params on ``device`` (pipeline.device_decode), then goes through the teacher."""
    from pipeline.device_decode import decode_and_augment

    out = []
    for lo in range(0, len(item["keys"]), batch_size):
        rows = slice(lo, lo + batch_size)
        views = decode_and_augment(item["encoded"][rows], item["params"][rows], path="device", channels=channels,
                                   size=aug.size, device=device, names=item["keys"][rows], recipe=aug.recipe)
        out.append(teacher_logits(teacher, views, norm, batch_size=batch_size, device=device,
                                  mixed_precision=mixed_precision))
    return np.concatenate(out)


def _finish_item(store: LogitStore, item: dict, logits: np.ndarray) -> None:
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise CacheError(f"teacher produced non-finite logits for sample '{item['keys'][i]}' (shard "
                         f"{item['shard']}, view {item['view']}); check the teacher checkpoint and "
                         "cache.mixed_precision. No done marker was written for this shard.")
    arrays = store.codec.encode(logits, item["labels"])
    try:
        # The labels come from the shard `load` checked against its sha256; written once per shard,
        # before its first done marker, so a finished row always has its labels in the store.
        if store.has_labels and not store.labels_written(item["shard"]):
            store.write_labels(item["shard"], item["labels"])
        store.write_row(item["view"], item["shard"], arrays, item["params"])
        store.mark_done(item["view"], item["shard"])
    except OSError as err:  # disk full, file-size limit, I/O error
        raise CacheError(f"{store.path}: writing view {item['view']}, shard {item['shard']} failed: "
                         f"{err}. Free disk space (or fix the file system) and rerun `aekt cache`: it "
                         "resumes, and this shard has no done marker.") from err


def write_items(store: LogitStore, source: ShardSource, teacher: torch.nn.Module,
                items: list[tuple[int, int]], cfg: CacheConfig, aug: AugmentConfig, *,
                norm: augment.Normalization, device: torch.device, progress: bool = True,
                main: bool = True) -> int:
    """Compute and write ``items``; encoding + writing runs on a thread, off the teacher's path."""
    loader = DataLoader(_ViewItems(source, items, aug), batch_size=None, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    pending: list[Future] = []
    done = 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        for item in Progress(len(items), "cache (view, shard) rows", "row", bar=progress, main=main,
                             logger=log).wrap(loader):
            # The DataLoader turns numpy arrays into tensors; the store wants numpy.
            item["params"], item["labels"] = np.asarray(item["params"]), np.asarray(item["labels"])
            if "encoded" in item:
                logits = device_view_logits(teacher, item, norm, aug, channels=source.manifest.channels,
                                            batch_size=cfg.batch_size, device=device,
                                            mixed_precision=cfg.mixed_precision)
            else:
                logits = teacher_logits(teacher, item["images"], norm, batch_size=cfg.batch_size,
                                        device=device, mixed_precision=cfg.mixed_precision)
            pending.append(writer.submit(_finish_item, store, item, logits))
            # Surface write errors early and bound memory to a couple of items in flight.
            while len(pending) > 2:
                pending.pop(0).result()
                done += 1
        for fut in pending:
            fut.result()
            done += 1
    return done


def pending_items(store: LogitStore) -> list[tuple[int, int]]:
    """Rows without a done marker, and marked rows whose chunk files (or their shard's labels chunk)
    are missing (rewritten)."""
    mask = store.marked_rows()
    missing = store.missing_chunks(mask)
    if store.has_labels:  # one stat per shard with a marker
        unlabelled = [int(s) for s in np.flatnonzero(mask.any(axis=0)) if not store.labels_written(int(s))]
        missing += [(int(v), s, "labels") for s in unlabelled for v in np.flatnonzero(mask[:, s])]
    for view, shard, name in missing:
        if mask[view, shard]:
            log.warning("%s: '%s' chunk of view %d, shard %d is missing although the row is marked "
                        "done; rewriting the row", store.path, name, view, shard)
        mask[view, shard] = False
    return [(int(v), int(s)) for v, s in np.argwhere(~mask)]
