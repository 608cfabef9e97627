"""What a logit store was built from: the ``provenance`` attrs of its zarr.json, validated against a
schema (types, ranges) before anything uses them (DESIGN invariant 3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.cache.codecs import CODEC_NAMES, Codec, make_codec
from pipeline.cache.errors import CacheError

# 2: the store also holds every training sample's label (`labels`); 1: it does not (readers then
# take the labels from the shards). Both are read; new stores are written as 2.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)


@dataclass(frozen=True)
class Provenance:
    """What a store was built from; stage 2 refuses a store whose provenance differs from its inputs."""

    dataset: str
    manifest_sha256: str
    teacher_arch: str
    teacher_sha256: str
    teacher_precision: str  # cache.mixed_precision: bf16/fp16 teacher logits differ from fp32 ones
    teacher_input_norm: dict[str, Any]  # the teacher's own input normalisation (its card's), mean/std
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
    # Which code made the pixels the teacher saw (pipeline.device_decode.pixel_source): "pil", or
    # "device-cpu" / "device-cuda" for augment.decode: device on encoded shards. Stores written
    # before it existed were all "pil".
    pixel_source: str = "pil"

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
        version = attrs.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in READABLE_SCHEMAS:
            raise CacheError(f"{where}: schema_version {version!r} is not "
                             f"{' or '.join(map(str, READABLE_SCHEMAS))}; rebuild the store with "
                             "`aekt cache --rebuild`.")
        raw = attrs.get("provenance")
        if not isinstance(raw, dict):
            raise CacheError(f"{where}: attrs have no 'provenance' mapping; not a logit store written "
                             "by `aekt cache`.")
        expected = {f.name: f.type for f in fields(cls)}
        raw = {"pixel_source": "pil"} | raw  # optional: stores written before it existed
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
