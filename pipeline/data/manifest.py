"""Dataset manifest: the committed JSON that names every shard, its index range and sha256.

``sha256`` is the hash of the canonical JSON (sorted keys, compact separators, UTF-8) of every
other field; downstream stages record it as the dataset's provenance. Files are pretty-printed
with sorted keys and a trailing newline, so an unchanged dataset rewrites the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.location import Location, join
from pipeline.data.samples import DataError, Sample
from pipeline.data.shards import read_shard, shard_name

SCHEMA_VERSION = 1
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: samples with global indices ``start <= i < end`` of its split."""

    name: str
    count: int
    start: int
    end: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]
    skipped: tuple[str, ...]  # source names of corrupt images left out (data.on_corrupt: skip)


def canonical_sha256(content: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``content`` (the manifest without its ``sha256``)."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    dataset: str
    source: dict
    classes: tuple[str, ...]
    channels: int
    image_format: str  # "png", "jpg", "mixed" (encoded) or "raw" (uint8 .npy pixels, data.format: raw)
    shard_size: int
    splits: dict[str, SplitInfo]
    sha256: str
    image_shape: tuple[int, int, int] | None = None  # raw only: every image's [H, W, C]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def build(cls, *, dataset: str, source: dict, classes: tuple[str, ...], channels: int,
              image_format: str, shard_size: int, splits: dict[str, SplitInfo],
              image_shape: tuple[int, int, int] | None = None) -> Manifest:
        """A manifest with its ``sha256`` computed from the other fields."""
        draft = cls(dataset=dataset, source=source, classes=tuple(classes), channels=channels,
                    image_format=image_format, shard_size=shard_size, splits=dict(splits),
                    sha256="", image_shape=None if image_shape is None else tuple(image_shape))
        content = draft._content()
        _validate(content, where="new manifest")
        return dataclasses.replace(draft, sha256=canonical_sha256(content))

    def _content(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "dataset": self.dataset,
            "source": json.loads(json.dumps(self.source)), "classes": list(self.classes),
            "channels": self.channels, "image_format": self.image_format,
            "shard_size": self.shard_size,
            "splits": {name: {"num_samples": s.num_samples, "skipped": list(s.skipped),
                              "shards": [dict(sh.__dict__) for sh in s.shards]}
                       for name, s in self.splits.items()},
        } | ({} if self.image_shape is None else {"image_shape": list(self.image_shape)})

    def to_json(self) -> str:
        return json.dumps({**self._content(), "sha256": self.sha256}, indent=2, sort_keys=True,
                          ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so readers never see half a manifest."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(self.to_json(), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Load and validate a manifest; DataError naming ``path`` on any inconsistency."""
        path = Path(path)
        where = f"manifest {path}"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{where}: not found; run `aekt prepare` (or `dvc repro prepare`) "
                            "to create it.") from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"{where}: not readable JSON: {exc}") from exc
        if not isinstance(raw, dict) or "sha256" not in raw:
            raise DataError(f"{where}: expected a JSON object with a 'sha256' field.")
        stored = raw.pop("sha256")
        _validate(raw, where=where)
        actual = canonical_sha256(raw)
        if stored != actual:
            raise DataError(f"{where}: sha256 field {stored!r} does not match its content "
                            f"({actual}); the file was edited by hand. Rerun `aekt prepare`.")
        splits = {
            name: SplitInfo(num_samples=s["num_samples"], skipped=tuple(s["skipped"]),
                            shards=tuple(ShardInfo(**sh) for sh in s["shards"]))
            for name, s in raw["splits"].items()}
        return cls(dataset=raw["dataset"], source=raw["source"], classes=tuple(raw["classes"]),
                   channels=raw["channels"], image_format=raw["image_format"],
                   shard_size=raw["shard_size"], splits=splits, sha256=stored,
                   image_shape=tuple(raw["image_shape"]) if "image_shape" in raw else None)

    def shard_paths(self, shards_dir: Location, split: str) -> list[Location]:
        """Paths (or URLs) of ``split``'s shards under ``shards_dir``, in index order."""
        if split not in self.splits:
            raise DataError(f"dataset {self.dataset!r} has no split {split!r}; its splits are "
                            f"{', '.join(self.splits) or 'none'}.")
        return [join(shards_dir, sh.name) for sh in self.splits[split].shards]

    def read_shard(self, shards_dir: Location, split: str, shard: int) -> list[Sample]:
        """Samples of shard number ``shard`` of ``split``, checked against this manifest: the
        shard's sha256, every label in ``[0, num_classes)`` and the indices ``[start, end)``."""
        info = self.splits[split].shards[shard]
        path = join(shards_dir, info.name)  # a local path or a URL
        samples = read_shard(path, expected_sha256=info.sha256, num_classes=self.num_classes)
        if [s.index for s in samples] != list(range(info.start, info.end)):
            found = f"[{samples[0].index}, {samples[-1].index + 1})" if samples else "nothing"
            raise DataError(f"shard {path}: holds samples {found}, but the manifest lists "
                            f"[{info.start}, {info.end}); rerun `aekt prepare` (or `dvc repro "
                            "prepare`) to rebuild the shards.")
        return samples


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise DataError(f"{where}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(c: dict[str, Any], *, where: str) -> None:
    """Check types, keys and the shard ranges of a manifest's content (without ``sha256``)."""
    keys = {"schema_version", "dataset", "source", "classes", "channels", "image_format",
            "shard_size", "splits"}
    raw = c.get("image_format") == "raw"
    keys |= {"image_shape"} if raw else set()
    _expect(set(c) == keys, where, f"fields {sorted(c)}, expected {sorted(keys | {'sha256'})}.")
    _expect(c["schema_version"] == SCHEMA_VERSION, where,
            f"schema_version {c['schema_version']!r}, this code reads {SCHEMA_VERSION}; rerun "
            "`aekt prepare`.")
    _expect(isinstance(c["dataset"], str) and bool(c["dataset"]), where, "dataset must be a name.")
    _expect(isinstance(c["source"], dict), where, "source must be an object.")
    classes = c["classes"]
    _expect(isinstance(classes, list) and bool(classes)
            and all(isinstance(x, str) for x in classes), where, "classes must be a list of names.")
    _expect(len(set(classes)) == len(classes), where, "class names must be unique.")
    _expect(c["channels"] in (1, 3) and _is_int(c["channels"]), where, "channels must be 1 or 3.")
    _expect(c["image_format"] in ("png", "jpg", "mixed", "raw"), where,
            f"image_format {c['image_format']!r} is not png, jpg, mixed or raw.")
    if raw:
        shape = c["image_shape"]
        _expect(isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)
                and shape[2] == c["channels"], where,
                f"image_shape {shape!r} must be [H, W, C] positive integers with C = channels.")
    size = c["shard_size"]
    _expect(_is_int(size) and size >= 1, where, "shard_size must be a positive integer.")
    _expect(isinstance(c["splits"], dict) and bool(c["splits"]), where, "splits must be non-empty.")
    for split, s in c["splits"].items():
        at = f"{where}: split {split!r}"
        _expect(isinstance(s, dict) and set(s) == {"num_samples", "shards", "skipped"}, at,
                "expected num_samples, shards and skipped.")
        _expect(isinstance(s["skipped"], list) and all(isinstance(x, str) for x in s["skipped"]),
                at, "skipped must be a list of names.")
        _expect(_is_int(s["num_samples"]) and isinstance(s["shards"], list), at,
                "num_samples must be an integer and shards a list.")
        start = 0
        for i, sh in enumerate(s["shards"]):
            _expect(isinstance(sh, dict) and set(sh) == {"name", "count", "start", "end", "sha256"},
                    at, f"shard {i} must have name, count, start, end, sha256.")
            _expect(sh["name"] == shard_name(split, i), at,
                    f"shard {i} is named {sh['name']!r}, expected {shard_name(split, i)!r}.")
            _expect(all(_is_int(sh[k]) for k in ("count", "start", "end")), at,
                    f"{sh['name']}: count/start/end must be integers.")
            _expect(sh["start"] == start and sh["end"] - sh["start"] == sh["count"] > 0, at,
                    f"{sh['name']}: range [{sh['start']}, {sh['end']}) with count {sh['count']} "
                    f"does not continue the previous shard at {start}.")
            last = i == len(s["shards"]) - 1
            _expect(sh["count"] == size or (last and sh["count"] <= size), at,
                    f"{sh['name']}: count {sh['count']} but shard_size is {size}.")
            _expect(isinstance(sh["sha256"], str) and bool(_SHA_RE.fullmatch(sh["sha256"])), at,
                    f"{sh['name']}: sha256 must be 64 lowercase hex digits.")
            start = sh["end"]
        _expect(start == s["num_samples"], at,
                f"shard counts sum to {start} but num_samples is {s['num_samples']}.")
