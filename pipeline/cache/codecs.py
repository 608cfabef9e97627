"""Logit codecs: pure encode/decode functions between float32 logits and stored arrays.

Every codec stores *logits* (or enough to rebuild them), so the distillation temperature stays a
stage-2 hyperparameter (DESIGN invariant 4). Bytes per sample-view before compression, C classes:

- ``fp32``: the logits as computed, 4C bytes, lossless (for exact cached-vs-online comparisons).
- ``fp16``: the logits in float16, 2C bytes. Relative error <= 2^-11 per logit.
- ``int8``: per-row affine uint8 quantisation, ``z ~ offset + scale * q``, C + 8 bytes. Absolute
  error <= scale / 2 = (max - min) / 510 per logit.
- ``topk``: the k largest logits (float16) and their indices, the target logit, and the tail's
  log-sum-exp; decoding fills every other class with ``lse_tail - log(n_tail)``, which keeps the
  tail's total probability mass exact at tau = 1 (and approximate at other temperatures: the KL
  error is measured by ``aekt verify-cache`` and ``aekt bench codecs``). 4k + 10 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class FieldSpec:
    row_shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Codec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def fields(self, num_classes: int) -> dict[str, FieldSpec]:
        """The arrays this codec stores per sample-view, with their row shapes and dtypes."""
        if self.name in ("fp32", "fp16"):
            return {"logits": FieldSpec((num_classes,), "float32" if self.name == "fp32" else "float16")}
        if self.name == "int8":
            return {"q": FieldSpec((num_classes,), "uint8"), "affine": FieldSpec((2,), "float32")}
        k = self.k(num_classes)
        index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max else "int32"
        return {"top_values": FieldSpec((k,), "float16"), "top_indices": FieldSpec((k,), index_dtype),
                "target_logit": FieldSpec((1,), "float16"), "tail_lse": FieldSpec((1,), "float32")}

    def k(self, num_classes: int) -> int:
        return min(int(self.params.get("k", 20)), num_classes)

    def raw_bytes_per_row(self, num_classes: int) -> int:
        return sum(int(np.prod(s.row_shape)) * np.dtype(s.dtype).itemsize
                   for s in self.fields(num_classes).values())

    def encode(self, logits: np.ndarray, targets: np.ndarray) -> Arrays:
        """float32 ``[B, C]`` logits (+ int ``[B]`` targets) -> the codec's arrays, ``[B, ...]`` each."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.name == "fp32":
            return {"logits": logits}
        if self.name == "fp16":
            return {"logits": encode_fp16(logits)}
        if self.name == "int8":
            q, affine = encode_int8(logits)
            return {"q": q, "affine": affine}
        return encode_topk(logits, np.asarray(targets), self.k(logits.shape[1]))

    def decode(self, arrays: Arrays, num_classes: int, targets: np.ndarray | None = None) -> np.ndarray:
        """The codec's arrays -> float32 ``[B, C]`` logits."""
        if self.name in ("fp32", "fp16"):
            return arrays["logits"].astype(np.float32)
        if self.name == "int8":
            return decode_int8(arrays["q"], arrays["affine"])
        if targets is None:
            raise ValueError("the topk codec needs the targets to place the stored target logit")
        return decode_topk(arrays, np.asarray(targets), num_classes)


CODEC_NAMES = ("fp32", "fp16", "int8", "topk")


def make_codec(name: str, *, topk: int = 20) -> Codec:
    if name not in CODEC_NAMES:
        raise ValueError(f"unknown codec {name!r}; valid: {', '.join(CODEC_NAMES)}")
    return Codec(name, {"k": topk} if name == "topk" else {})


def encode_fp16(logits: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is reported below, as an error
        out = logits.astype(np.float16)
    if not np.isfinite(out).all():
        raise OverflowError("logits exceed the float16 range (|z| > 65504); use the int8 codec")
    return out


def encode_int8(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = logits.min(axis=1, keepdims=True)
    hi = logits.max(axis=1, keepdims=True)
    # A constant row has no range: any positive scale reproduces it exactly.
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(np.float32)
    q = np.clip(np.rint((logits - lo) / scale), 0, 255).astype(np.uint8)
    return q, np.concatenate([scale, lo], axis=1).astype(np.float32)


def decode_int8(q: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine[:, 1:2] + affine[:, 0:1] * q.astype(np.float32)).astype(np.float32)


def encode_topk(logits: np.ndarray, targets: np.ndarray, k: int) -> Arrays:
    n, c = logits.shape
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]  # [B, k], unordered
    order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    kept = np.zeros((n, c), dtype=bool)
    np.put_along_axis(kept, top, True, axis=1)
    kept[np.arange(n), targets] = True
    tail = np.where(kept, -np.inf, logits.astype(np.float64))
    m = tail.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(tail - m).sum(axis=1, keepdims=True)) + m  # -inf when no tail
    return {"top_values": encode_fp16(np.take_along_axis(logits, top, axis=1)),
            "top_indices": top.astype(np.int16 if c <= np.iinfo(np.int16).max else np.int32),
            "target_logit": encode_fp16(logits[np.arange(n), targets][:, None]),
            "tail_lse": lse.astype(np.float32)}


def decode_topk(arrays: Arrays, targets: np.ndarray, num_classes: int) -> np.ndarray:
    top = arrays["top_indices"].astype(np.int64)
    n = top.shape[0]
    kept = np.zeros((n, num_classes), dtype=bool)
    np.put_along_axis(kept, top, True, axis=1)
    kept[np.arange(n), targets] = True
    n_tail = num_classes - kept.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        fill = arrays["tail_lse"].astype(np.float64) - np.log(np.maximum(n_tail, 1))
    out = np.broadcast_to(np.where(n_tail > 0, fill, 0.0), (n, num_classes)).astype(np.float32)
    out[np.arange(n), targets] = arrays["target_logit"][:, 0].astype(np.float32)
    np.put_along_axis(out, top, arrays["top_values"].astype(np.float32), axis=1)
    return out
