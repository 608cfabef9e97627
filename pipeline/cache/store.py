"""The Zarr (v3) teacher-logit store: layout, provenance and per-(view, shard) done markers.

Layout of ``cache/<dataset>-<teacher>.zarr``::

    zarr.json            attrs: {"schema_version": 2, "provenance": {...}}
    <codec arrays>/      e.g. logits (V, N, C) float16 for fp16, chunks (1, shard_size, C)
    params/              (V, N, P) float32 augmentation parameters, chunks (1, shard_size, P)
    labels/              (N,) int32 label of every training sample, chunks (shard_size,); -1 = unwritten
    done/                (V, n_shards) uint8, chunks (1, 1): 1 once chunk row (v, shard) is complete

Shards are contiguous index ranges of ``shard_size`` samples (the last may be shorter), so one
shard is exactly one chunk row and two writers never share a chunk (DESIGN invariant 1). A done
marker is written only after every array of its chunk row is written, so a killed writer leaves at
worst a chunk that the rerun overwrites (invariant 5). A shard's labels chunk is written (from the
shard the writer read and checked against its sha256) before the first done marker of that shard,
so every finished row has its labels in the store, and `aekt inspect` need not read the shards.
Stores of schema 1 (written before labels were stored) have no ``labels``; they are still read.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import asdict
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

# CacheError and Provenance are imported from here by the rest of the project.
from pipeline.cache.errors import CacheError
from pipeline.cache.provenance import SCHEMA_VERSION, Provenance
from pipeline.cache.store_folder import (
    bytes_under,
    clear_object_store,
    key_exists,
    keys_under,
    refuse_to_replace,
    remove_leftover,
)
from pipeline.data.location import Location, as_location, is_object_store

log = logging.getLogger(__name__)

# zarr.config.set is process-global: serialise our use of it (the stage-1 writer runs on a thread).
_ZARR_CONFIG_LOCK = threading.Lock()
# A damaged chunk under matching provenance: `--rebuild` would keep the store, so it must go.
_DELETE = "the store is corrupt — delete it and rerun `aekt cache` (or `dvc repro cache`)"


def _compressors(name: str, clevel: int) -> list[Any] | None:
    if name == "none":
        return None
    return [BloscCodec(cname=name, clevel=clevel, shuffle="bitshuffle" if name == "zstd" else "shuffle")]


class LogitStore:
    """A handle on one store; cheap to open, safe to use from several reader processes at once."""

    def __init__(self, path: Location, group: zarr.Group, provenance: Provenance):
        self.path = as_location(path)  # a local folder, or an object-store URL
        self.group = group
        self.provenance = provenance
        self.codec = provenance.make_codec()
        self._arrays: dict[str, Any] = {}

    def array(self, name: str) -> Any:
        """The named zarr array, opened once: re-opening per chunk row re-reads its metadata and
        dominated read time for small rows (bench/cache_read)."""
        if name not in self._arrays:
            # Write every chunk, also one equal to the fill value (zarr skips those by default): a
            # finished row's chunk files then always exist, so a missing one is damage.
            # The setting is read when the array object is made.
            with _ZARR_CONFIG_LOCK, zarr.config.set({"array.write_empty_chunks": True}):
                self._arrays[name] = self.group[name]
        return self._arrays[name]

    def row_arrays(self) -> list[str]:
        """The arrays one (view, shard) chunk row spans: the codec's and params."""
        return [*self.codec.fields(self.provenance.num_classes), "params"]

    def chunk_key(self, name: str, view: int, shard: int) -> str:
        """Store key of the chunk of array ``name`` that holds row (view, shard) (``labels`` has no
        view axis: its chunk of ``shard``)."""
        arr = self.array(name)
        coords = (shard,) if arr.ndim == 1 else (view, shard, *([0] * (arr.ndim - 2)))
        return f"{arr.store_path.path}/{arr.metadata.encode_chunk_key(coords)}"

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Location, mode: str = "r") -> LogitStore:
        path = as_location(path)
        if not key_exists(path, "zarr.json"):
            raise CacheError(f"{path}: not a logit store (no zarr.json). Build it with `aekt cache` "
                             "(or `dvc repro cache`).")
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as err:  # zarr raises several types for a damaged store
            raise CacheError(f"{path}: cannot open the Zarr store ({err}); delete it and rerun "
                             "`aekt cache`.") from err
        prov = Provenance.from_attrs(dict(group.attrs), str(path))
        store = cls(path, group, prov)
        store._check_arrays()
        return store

    @classmethod
    def create(cls, path: Location, prov: Provenance, *, compressor: str = "zstd",
               clevel: int = 3) -> LogitStore:
        path = as_location(path)
        refuse_to_replace(path)  # before anything is written: only our own store may be replaced
        if is_object_store(path):
            return cls._create_in_place(str(path), prov, compressor, clevel)
        # Built beside the store and renamed into place: a kill mid-creation leaves no store (a
        # rerun creates it), never one without provenance that a plain rerun would refuse. An old
        # store is renamed aside first, so `path` is never a half-deleted store either.
        tmp, old = (path.with_name(f".{path.name}.{suffix}") for suffix in ("tmp-create", "tmp-old"))
        for leftover in (tmp, old):
            remove_leftover(leftover)
        _init_arrays(zarr.open_group(str(tmp), mode="w"), prov, compressor, clevel)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        try:
            shutil.rmtree(old)
        except FileNotFoundError:
            pass
        except OSError as err:  # the new store is in place; the next create removes the rest
            log.warning("%s: could not remove the replaced store (%s)", old, err)
        return cls(path, zarr.open_group(str(path), mode="r+"), prov)

    @classmethod
    def _create_in_place(cls, url: str, prov: Provenance, compressor: str, clevel: int) -> LogitStore:
        """Create the store on an object store, which has no rename: the old store (or a killed
        create's leftovers) is deleted group metadata first, the arrays are created, and the group
        attrs (schema, provenance) are written last, so until then the prefix is no store and a
        rerun creates it again."""
        clear_object_store(url)
        group = zarr.open_group(url, mode="w")
        _init_arrays(group, prov, compressor, clevel)
        return cls(url, zarr.open_group(url, mode="r+"), prov)

    def _check_arrays(self) -> None:
        prov = self.provenance
        wanted = {name: ((prov.views, prov.num_samples, *spec.row_shape), spec.dtype)
                  for name, spec in self.codec.fields(prov.num_classes).items()}
        wanted["params"] = ((prov.views, prov.num_samples, prov.num_params), "float32")
        wanted["done"] = ((prov.views, prov.num_shards), "uint8")
        if self.has_labels:
            wanted["labels"] = ((prov.num_samples,), "int32")
        rebuild = "the store is damaged — rebuild it with `aekt cache --rebuild`"
        for name, (shape, dtype) in wanted.items():
            try:
                arr = self.group.get(name)
            except Exception as err:  # zarr raises several types for metadata it cannot use
                raise CacheError(f"{self.path}/{name}: unusable array metadata ({type(err).__name__}: "
                                 f"{err}); {rebuild}.") from err
            if not isinstance(arr, zarr.Array):
                raise CacheError(f"{self.path}: array '{name}' is missing; the store is incomplete — "
                                 "delete it and rerun `aekt cache`.")
            if tuple(arr.shape) != shape or arr.dtype != np.dtype(dtype):
                raise CacheError(f"{self.path}/{name}: {arr.dtype} {tuple(arr.shape)} does not match "
                                 f"the provenance's {dtype} {shape}; {rebuild}.")
            if name != "done" and arr.chunks[min(1, arr.ndim - 1)] != prov.shard_size:
                raise CacheError(f"{self.path}/{name}: chunks {arr.chunks} are not aligned to "
                                 f"shard_size {prov.shard_size}; {rebuild}.")

    # ---- done markers --------------------------------------------------------------------------
    def marked_rows(self) -> np.ndarray:
        """bool ``[V, n_shards]`` of set done markers; a marker chunk that cannot be read counts as
        not done."""
        done = self.array("done")
        try:
            return done[:] == 1
        except Exception:  # a torn marker write: fall back to reading marker by marker
            mask = np.zeros(done.shape, dtype=bool)
            for v in range(done.shape[0]):
                for s in range(done.shape[1]):
                    try:
                        mask[v, s] = done[v, s] == 1
                    except Exception:
                        log.warning("%s: unreadable done marker (%d, %d); redoing it", self.path, v, s)
            return mask

    def done_mask(self) -> np.ndarray:
        """bool ``[V, n_shards]`` of finished rows, for readers: raises if a finished row lacks a
        chunk file (zarr would read it as zeros)."""
        mask = self.marked_rows()
        missing = self.missing_chunks(mask)
        if missing:
            view, shard, name = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise self._missing_error(view, shard, name, more)
        return mask

    def missing_chunks(self, mask: np.ndarray) -> list[tuple[int, int, str]]:
        """(view, shard, array) of the rows in ``mask`` whose chunk file is absent; one listing of
        each array's folder, so its cost grows with the file count, not with the samples."""
        rows = [(int(v), int(s)) for v, s in np.argwhere(mask)]
        if not rows:
            return []
        out = []
        for name in self.row_arrays():
            present = keys_under(self.path, name)
            out += [(v, s, name) for v, s in rows if self.chunk_key(name, v, s) not in present]
        return [m for m in out if not (m[2] == "params" and self._params_all_fill(m[0], m[1]))]

    def _params_all_fill(self, view: int, shard: int) -> bool:
        """Whether row (view, shard)'s params are all zero, i.e. a chunk that stores written before
        write_empty_chunks was set legitimately skipped (the params are a pure function, so this
        is exact)."""
        from pipeline import augment  # torch: only on this rare path

        start, end = self.provenance.shard_range(shard)
        expected = augment.sample_params(self.provenance.recipe, seed=self.provenance.augment_seed,
                                         view=view, indices=np.arange(start, end))
        return not expected.any()

    def _missing_error(self, view: int, shard: int, name: str, more: str = "") -> CacheError:
        return CacheError(f"{self.path}: the chunk file {self.chunk_key(name, view, shard)} ('{name}' of "
                          f"view {view}, shard {shard}) is missing{more} although its done marker is "
                          "set, so it would read as zeros; the store is damaged — rerun `aekt cache` "
                          "(it rewrites rows whose chunk files are missing), or delete the store and "
                          "rerun `aekt cache`.")

    def mark_done(self, view: int, shard: int) -> None:
        self.array("done")[view, shard] = 1

    # ---- labels (schema 2) ---------------------------------------------------------------------
    @property
    def has_labels(self) -> bool:
        """Whether the store holds the training labels: schema 2 (``open`` checks the array is there);
        a schema-1 store does not."""
        return self.group.attrs["schema_version"] >= 2

    def labels_written(self, shard: int) -> bool:
        """Whether shard ``shard``'s labels chunk exists (a stat: zarr writes a chunk file whole)."""
        return self.has_labels and key_exists(self.path, self.chunk_key("labels", -1, shard))

    def write_labels(self, shard: int, labels: np.ndarray) -> None:
        start, end = self.provenance.shard_range(shard)
        self.array("labels")[start:end] = labels

    def read_labels(self, shard: int) -> np.ndarray | None:
        """int64 labels ``[n]`` of shard ``shard``, or None when the store does not hold them (schema 1,
        or a missing labels chunk): the caller then reads the shard."""
        if not self.labels_written(shard):
            return None
        start, end = self.provenance.shard_range(shard)
        try:
            labels = np.asarray(self.array("labels")[start:end], dtype=np.int64)
        except Exception as err:  # zarr/numcodecs raise many types for a chunk that does not decode
            raise CacheError(f"{self.path}: cannot read the labels of shard {shard}: "
                             f"{type(err).__name__}: {err}; {_DELETE}.") from err
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= self.provenance.num_classes:
            raise CacheError(f"{self.path}: the labels of shard {shard} hold values outside 0.."
                             f"{self.provenance.num_classes - 1}; {_DELETE}.")
        return labels

    # ---- chunk rows ----------------------------------------------------------------------------
    def write_row(self, view: int, shard: int, arrays: dict[str, np.ndarray], params: np.ndarray) -> None:
        start, end = self.provenance.shard_range(shard)
        for name, values in arrays.items():
            self.array(name)[view, start:end] = values
        self.array("params")[view, start:end] = params

    def _check_row_present(self, view: int, shard: int) -> None:
        """Raise if a chunk file of row (view, shard) is absent: zarr would return the fill value.
        One stat per array for a local folder (zarr's own ``store.exists`` costs ~0.4 ms per row
        through its IO thread, a stat a few microseconds); a HEAD request on an object store."""
        for name in self.row_arrays():
            if not key_exists(self.path, self.chunk_key(name, view, shard)) and \
                    not (name == "params" and self._params_all_fill(view, shard)):
                raise self._missing_error(view, shard, name)

    def read_row(self, view: int, shard: int, targets: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Decoded float32 logits ``[n, C]`` and params ``[n, P]`` of one (view, shard) chunk row."""
        start, end = self.provenance.shard_range(shard)
        self._check_row_present(view, shard)
        try:
            arrays = {name: self.array(name)[view, start:end] for name in self.row_arrays()}
        except Exception as err:  # zarr/numcodecs raise many types for a chunk that does not decode
            raise CacheError(f"{self.path}: cannot read chunk row (view {view}, shard {shard}): "
                             f"{type(err).__name__}: {err}; {_DELETE}.") from err
        params = arrays.pop("params")
        logits = self.codec.decode(arrays, self.provenance.num_classes, targets)
        if not np.isfinite(logits).all():
            bad = int(np.argwhere(~np.isfinite(logits))[0, 0]) + start
            raise CacheError(f"{self.path}: non-finite logits for view {view}, sample index {bad}; "
                             f"{_DELETE}.")
        return logits, params

    def disk_bytes(self) -> dict[str, int]:
        """On-disk bytes per array (compressed chunks + metadata)."""
        out = {}
        for name in self.group.array_keys():
            out[name] = bytes_under(self.path, name)
        return out


def _init_arrays(group: zarr.Group, prov: Provenance, compressor: str, clevel: int) -> None:
    """Create the store's arrays in ``group``, then write its attrs (last: they make it a store)."""
    v, n, s = prov.views, prov.num_samples, prov.shard_size
    comp = _compressors(compressor, clevel)
    for name, spec in prov.make_codec().fields(prov.num_classes).items():
        group.create_array(name, shape=(v, n, *spec.row_shape), chunks=(1, s, *spec.row_shape),
                           dtype=spec.dtype, compressors=comp, fill_value=0)
    group.create_array("params", shape=(v, n, prov.num_params), chunks=(1, s, prov.num_params),
                       dtype="float32", compressors=comp, fill_value=0)
    group.create_array("labels", shape=(n,), chunks=(s,), dtype="int32", compressors=comp, fill_value=-1)
    # One uncompressed one-byte chunk per marker: each (view, shard) marker is its own object.
    group.create_array("done", shape=(v, prov.num_shards), chunks=(1, 1), dtype="uint8",
                       compressors=None, fill_value=0)
    group.attrs.update({"schema_version": SCHEMA_VERSION, "provenance": asdict(prov)})
