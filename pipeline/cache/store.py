"""The Zarr (v3) teacher-logit store: layout, provenance and per-(view, shard) done markers.

Layout of ``cache/<dataset>-<teacher>.zarr``::

    zarr.json            attrs: {"schema_version": 1, "provenance": {...}}
    <codec arrays>/      e.g. logits (V, N, C) float16 for fp16, chunks (1, shard_size, C)
    params/              (V, N, P) float32 augmentation parameters, chunks (1, shard_size, P)
    done/                (V, n_shards) uint8, chunks (1, 1): 1 once chunk row (v, shard) is complete

Shards are contiguous index ranges of ``shard_size`` samples (the last may be shorter), so one
shard is exactly one chunk row and two writers never share a chunk (DESIGN invariant 1). A done
marker is written only after every array of its chunk row is written, so a killed writer leaves at
worst a chunk that the rerun overwrites (invariant 5).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.cache.codecs import CODEC_NAMES, Codec, make_codec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# A damaged chunk under matching provenance: `--rebuild` would keep the store, so it must go.
_DELETE = "the store is corrupt — delete it and rerun `aekt cache` (or `dvc repro cache`)"


class CacheError(ValueError):
    """The logit store is missing, malformed, or does not match the inputs it is used with."""


@dataclass(frozen=True)
class Provenance:
    """What a store was built from; stage 2 refuses a store whose provenance differs from its inputs."""

    dataset: str
    manifest_sha256: str
    teacher_arch: str
    teacher_sha256: str
    teacher_precision: str  # cache.mixed_precision: bf16/fp16 teacher logits differ from fp32 ones
    recipe: str
    augment_seed: int
    image_size: int
    views: int
    codec: str
    codec_params: dict[str, Any]
    num_classes: int
    num_samples: int
    shard_size: int
    num_params: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def make_codec(self) -> Codec:
        return make_codec(self.codec, topk=int(self.codec_params.get("k", 20)))

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> Provenance:
        """Validate the stored attrs against the schema (types, ranges) before anything uses them."""
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(f"{where}: schema_version {attrs.get('schema_version')!r} is not "
                             f"{SCHEMA_VERSION}; rebuild the store with `aekt cache --rebuild`.")
        raw = attrs.get("provenance")
        if not isinstance(raw, dict):
            raise CacheError(f"{where}: attrs have no 'provenance' mapping; not a logit store written "
                             "by `aekt cache`.")
        expected = {f.name: f.type for f in fields(cls)}
        missing = sorted(set(expected) - set(raw))
        if missing:
            raise CacheError(f"{where}: provenance lacks {', '.join(missing)}; rebuild the store with "
                             "`aekt cache --rebuild`.")
        types = {"str": str, "int": int, "dict[str, Any]": dict}
        for name, type_name in expected.items():
            value = raw[name]
            want = types[str(type_name)]
            if not isinstance(value, want) or isinstance(value, bool):
                raise CacheError(f"{where}: provenance.{name} should be {want.__name__}, got {value!r}; "
                                 "rebuild the store with `aekt cache --rebuild`.")
        for name in ("views", "num_classes", "num_samples", "shard_size", "num_params"):
            if raw[name] < 1:
                raise CacheError(f"{where}: provenance.{name} must be >= 1, got {raw[name]}; rebuild "
                                 "the store with `aekt cache --rebuild`.")
        k = raw["codec_params"].get("k", 1)
        if raw["codec"] not in CODEC_NAMES or set(raw["codec_params"]) - {"k"} or \
                not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CacheError(f"{where}: provenance codec {raw['codec']!r} with params "
                             f"{raw['codec_params']!r} is not one of {', '.join(CODEC_NAMES)} (topk "
                             "takes a positive integer k); rebuild the store with `aekt cache --rebuild`.")
        return cls(**{k: raw[k] for k in expected})

    def mismatches(self, other: Provenance) -> list[str]:
        a, b = asdict(self), asdict(other)
        return [f"{k}: store has {a[k]!r}, inputs give {b[k]!r}" for k in a if a[k] != b[k]]


def _compressors(name: str, clevel: int) -> list[Any] | None:
    if name == "none":
        return None
    return [BloscCodec(cname=name, clevel=clevel, shuffle="bitshuffle" if name == "zstd" else "shuffle")]


class LogitStore:
    """A handle on one store; cheap to open, safe to use from several reader processes at once."""

    def __init__(self, path: str | Path, group: zarr.Group, provenance: Provenance):
        self.path = Path(path)
        self.group = group
        self.provenance = provenance
        self.codec = provenance.make_codec()
        self._arrays: dict[str, Any] = {}

    def array(self, name: str) -> Any:
        """The named zarr array, opened once: re-opening per chunk row re-reads its metadata and
        dominated read time for small rows (bench/cache_read)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> LogitStore:
        path = Path(path)
        if not (path / "zarr.json").is_file():
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
    def create(cls, path: str | Path, prov: Provenance, *, compressor: str = "zstd",
               clevel: int = 3) -> LogitStore:
        path = Path(path)
        # Built beside the store and renamed into place: a kill mid-creation leaves no store (a
        # rerun creates it), never one without provenance that a plain rerun would refuse.
        tmp = path.with_name(f".{path.name}.tmp-create")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(str(tmp), mode="w")
        v, n, s = prov.views, prov.num_samples, prov.shard_size
        comp = _compressors(compressor, clevel)
        for name, spec in prov.make_codec().fields(prov.num_classes).items():
            group.create_array(name, shape=(v, n, *spec.row_shape), chunks=(1, s, *spec.row_shape),
                               dtype=spec.dtype, compressors=comp, fill_value=0)
        group.create_array("params", shape=(v, n, prov.num_params), chunks=(1, s, prov.num_params),
                           dtype="float32", compressors=comp, fill_value=0)
        # One uncompressed one-byte chunk per marker: each (view, shard) marker is its own object.
        group.create_array("done", shape=(v, prov.num_shards), chunks=(1, 1), dtype="uint8",
                           compressors=None, fill_value=0)
        group.attrs.update({"schema_version": SCHEMA_VERSION, "provenance": asdict(prov)})
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return cls(path, zarr.open_group(str(path), mode="r+"), prov)

    def _check_arrays(self) -> None:
        prov = self.provenance
        wanted = {name: ((prov.views, prov.num_samples, *spec.row_shape), spec.dtype)
                  for name, spec in self.codec.fields(prov.num_classes).items()}
        wanted["params"] = ((prov.views, prov.num_samples, prov.num_params), "float32")
        wanted["done"] = ((prov.views, prov.num_shards), "uint8")
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
            if name != "done" and arr.chunks[1] != prov.shard_size:
                raise CacheError(f"{self.path}/{name}: chunks {arr.chunks} are not aligned to "
                                 f"shard_size {prov.shard_size}; {rebuild}.")

    # ---- done markers --------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        """bool ``[V, n_shards]``; a marker chunk that cannot be read counts as not done."""
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

    def mark_done(self, view: int, shard: int) -> None:
        self.array("done")[view, shard] = 1

    # ---- chunk rows ----------------------------------------------------------------------------
    def write_row(self, view: int, shard: int, arrays: dict[str, np.ndarray], params: np.ndarray) -> None:
        start, end = self.provenance.shard_range(shard)
        for name, values in arrays.items():
            self.array(name)[view, start:end] = values
        self.array("params")[view, start:end] = params

    def read_row(self, view: int, shard: int, targets: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Decoded float32 logits ``[n, C]`` and params ``[n, P]`` of one (view, shard) chunk row."""
        start, end = self.provenance.shard_range(shard)
        try:
            arrays = {name: self.array(name)[view, start:end]
                      for name in [*self.codec.fields(self.provenance.num_classes), "params"]}
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
            out[name] = sum(f.stat().st_size for f in (self.path / name).rglob("*") if f.is_file())
        return out
