"""Codecs: pure encode/decode round trips within each codec's stated error."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cache.codecs import CODEC_NAMES, make_codec
from pipeline.cache.verify import kl_at


def logits_and_targets(n: int = 64, c: int = 100, seed: int = 0, std: float = 2.0,
                       margin: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, c, n)
    z = rng.normal(0, std, (n, c)).astype(np.float32)
    z[np.arange(n), targets] += margin  # a confident teacher
    return z, targets


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_roundtrip_shapes_and_declared_fields(name: str) -> None:
    z, y = logits_and_targets()
    codec = make_codec(name, topk=10)
    arrays = codec.encode(z, y)
    fields = codec.fields(z.shape[1])
    assert set(arrays) == set(fields)
    for key, spec in fields.items():
        assert arrays[key].shape == (len(z), *spec.row_shape) and arrays[key].dtype == np.dtype(spec.dtype)
    assert codec.raw_bytes_per_row(100) == sum(a[0].nbytes for a in arrays.values())
    assert codec.decode(arrays, z.shape[1], y).shape == z.shape


def test_fp32_is_lossless_and_fp16_within_half_precision() -> None:
    z, y = logits_and_targets()
    np.testing.assert_array_equal(make_codec("fp32").decode(make_codec("fp32").encode(z, y), 100), z)
    fp16 = make_codec("fp16")
    err = np.abs(fp16.decode(fp16.encode(z, y), 100) - z)
    assert (err <= np.abs(z) * 2.0**-11 + 1e-7).all()


def test_int8_error_is_bounded_by_half_a_step() -> None:
    z, y = logits_and_targets()
    codec = make_codec("int8")
    out = codec.decode(codec.encode(z, y), 100)
    step = (z.max(1) - z.min(1)) / 255
    assert (np.abs(out - z).max(1) <= step / 2 + 1e-5).all()
    const = np.full((2, 5), 3.0, dtype=np.float32)  # zero range must not divide by zero
    np.testing.assert_allclose(codec.decode(codec.encode(const, np.zeros(2, int)), 5), const)


def test_topk_keeps_top_and_target_and_tail_mass_at_tau1() -> None:
    # p_t ~ 0.7 on average, like a trained ImageNet teacher; a flat high-entropy tail loses more
    # (the codec's KL is reported by `aekt verify-cache`, not assumed).
    z, y = logits_and_targets(c=1000, std=1.0, margin=8.5)
    codec = make_codec("topk", topk=20)
    out = codec.decode(codec.encode(z, y), 1000, y)
    top = np.argsort(-z, axis=1)[:, :20]
    np.testing.assert_allclose(np.take_along_axis(out, top, 1), np.take_along_axis(z, top, 1), rtol=1e-3)
    np.testing.assert_allclose(out[np.arange(len(y)), y], z[np.arange(len(y)), y], rtol=1e-3)
    # The filled tail carries exactly the tail's probability mass at tau = 1.
    def lse(a):
        return np.log(np.exp(a - a.max(1, keepdims=True)).sum(1)) + a.max(1)
    # (to fp16 rounding of the kept logits: |z| ~ 10 gives ~5e-3)
    np.testing.assert_allclose(lse(out.astype(np.float64)), lse(z.astype(np.float64)), atol=1e-2)
    # The only loss is the flattened tail: KL = sum_tail p_j log(p_j / (P_tail / n_tail)).
    p = np.exp(z - lse(z.astype(np.float64))[:, None])
    tail = np.ones_like(p, dtype=bool)
    np.put_along_axis(tail, top, False, 1)
    tail[np.arange(len(y)), y] = False
    p_tail = np.where(tail, p, 0).sum(1, keepdims=True)
    ideal = np.where(tail, p * np.log(p * tail.sum(1, keepdims=True) / p_tail), 0).sum(1)
    np.testing.assert_allclose(kl_at(z, out, 1.0), ideal, atol=5e-3)


def test_topk_requires_targets_and_unknown_codec_is_named() -> None:
    z, y = logits_and_targets(c=30)
    codec = make_codec("topk", topk=5)
    with pytest.raises(ValueError, match="needs the targets"):
        codec.decode(codec.encode(z, y), 30)
    with pytest.raises(ValueError, match="valid: fp32, fp16, int8, topk"):
        make_codec("bf16")


def test_fp16_overflow_is_an_error() -> None:
    with pytest.raises(OverflowError, match="int8"):
        make_codec("fp16").encode(np.array([[1e6, 0.0]], dtype=np.float32), np.zeros(1, int))
