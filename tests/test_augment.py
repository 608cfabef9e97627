"""Augmentation parameters are a pure function of (seed, view, index); one apply path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import augment


@pytest.mark.parametrize("recipe", ["digits", "cifar", "imagenet"])
def test_params_are_pure_and_order_independent(recipe: str) -> None:
    idx = np.arange(50)
    a = augment.sample_params(recipe, seed=3, view=2, indices=idx)
    b = augment.sample_params(recipe, seed=3, view=2, indices=idx[::-1])[::-1]
    assert a.dtype == np.float32 and a.shape == (50, augment.recipe_info(recipe).num_params)
    np.testing.assert_array_equal(a, b)  # a sample's params do not depend on its batch
    assert not np.array_equal(a, augment.sample_params(recipe, seed=3, view=3, indices=idx))
    assert not np.array_equal(a, augment.sample_params(recipe, seed=4, view=2, indices=idx))


def test_param_ranges_cover_the_recipe() -> None:
    idx = np.arange(4000)
    digits = augment.sample_params("digits", seed=0, view=0, indices=idx)
    assert set(np.unique(digits)) == {-1.0, 0.0, 1.0}
    cifar = augment.sample_params("cifar", seed=0, view=0, indices=idx)
    assert set(np.unique(cifar[:, 0])) == set(range(9)) and set(np.unique(cifar[:, 2])) == {0.0, 1.0}
    rrc = augment.sample_params("imagenet", seed=0, view=0, indices=idx)
    assert rrc[:, 0].min() >= 0.08 and rrc[:, 0].max() <= 1.0
    u = augment.uniform(0, 0, idx, 1)[:, 0]
    assert abs(u.mean() - 0.5) < 0.02 and u.min() >= 0 and u.max() < 1


def test_cifar_crop_and_flip_match_a_direct_reference() -> None:
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, 4:36, 4:36] = img
    for dx, dy, flip in [(0, 0, 0), (8, 8, 1), (3, 5, 1), (4, 4, 0)]:
        ref = padded[:, dy:dy + 32, dx:dx + 32]
        ref = ref.flip(-1) if flip else ref
        out = augment.apply("cifar", img, np.array([dx, dy, flip], dtype=np.float32))
        assert torch.equal(out, ref)


def test_digits_shift_moves_content() -> None:
    img = torch.zeros(1, 8, 8, dtype=torch.uint8)
    img[0, 3, 3] = 200
    out = augment.apply("digits", img, np.array([1, -1], dtype=np.float32))
    assert out[0, 2, 4] == 200 and out.sum() == 200


def test_batch_and_single_paths_agree() -> None:
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    params = augment.sample_params("cifar", seed=1, view=0, indices=np.arange(16))
    batch = augment.apply_batch("cifar", images, torch.from_numpy(params))
    for i in range(16):
        assert torch.equal(batch[i], augment.apply("cifar", images[i], params[i]))


def test_imagenet_crop_is_deterministic_and_sized() -> None:
    img = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    params = augment.sample_params("imagenet", seed=0, view=1, indices=np.arange(3))
    for p in params:
        top, left, h, w = augment.crop_box(p, 375, 500)
        assert top >= 0 and top + h <= 375 and left >= 0 and left + w <= 500
        a = augment.apply("imagenet", img, p, size=64)
        assert a.shape == (3, 64, 64) and torch.equal(a, augment.apply("imagenet", img, p, size=64))
    small = torch.randint(0, 256, (1, 40, 30), dtype=torch.uint8)  # smaller than the output size
    assert augment.apply("imagenet", small, params[0], size=64).shape == (1, 64, 64)
    assert augment.eval_transform("imagenet", img, size=64).shape == (3, 64, 64)


def test_unknown_recipe_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: digits, cifar, imagenet"):
        augment.sample_params("mnist", seed=0, view=0, indices=np.arange(2))
