"""Replayable augmentation: parameters are a pure function of (seed, view, index).

Stage 1 samples the parameters of view ``v`` of sample ``i`` with :func:`sample_params`, applies them
with :func:`apply`, feeds the teacher, and stores the parameters beside the logits. Stage 2 reads the
stored parameters and calls the same :func:`apply`, so the student sees exactly the pixels the teacher
saw. Parameters are float32 vectors (integers are exact in float32), one layout per recipe:

- ``digits``: ``(dx, dy)`` shifts in {-1, 0, 1} pixels with zero fill (8x8 images; no flip, digits
  are not mirror-symmetric).
- ``cifar``: ``(dx, dy, flip)``: the top-left corner of a 32x32 crop from the image zero-padded by 4,
  then a horizontal flip (the standard CIFAR recipe).
- ``imagenet``: ``(scale, log_ratio, u, v, flip)``: RandomResizedCrop drawn independently of the image
  size (area fraction in [0.08, 1], log aspect ratio in [log 3/4, log 4/3], position fractions u, v),
  turned into a pixel box by :func:`crop_box` once the image size is known. Unlike torchvision's
  rejection loop, an oversized box is clamped to the image (a documented simplification that keeps
  the parameters independent of the image, so they can be sampled without decoding it).

Randomness comes from a counter-based hash (SplitMix64 finaliser chained over seed, view, index and
draw number): no state, vectorised over indices, identical on every platform and process split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    num_params: int
    fixed_size: bool  # output size equals input size, so whole batches can be augmented at once
    mean: tuple[float, ...]
    std: tuple[float, ...]


RECIPES: dict[str, RecipeInfo] = {
    # digits pixel statistics over the whole sklearn set (values /16 -> [0, 1]).
    "digits": RecipeInfo("digits", 2, True, (0.3053,), (0.3760,)),
    # CIFAR-100 training-set statistics (used for CIFAR-10 too: the difference is < 0.02).
    "cifar": RecipeInfo("cifar", 3, True, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": RecipeInfo("imagenet", 5, False, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

CIFAR_PAD = 4
DIGITS_SHIFT = 1
RRC_SCALE = (0.08, 1.0)
RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def recipe_info(recipe: str) -> RecipeInfo:
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return RECIPES[recipe]


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, view: int, indices: np.ndarray, num_draws: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): ``[N, num_draws]`` float64, a pure function of the inputs."""
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    with np.errstate(over="ignore"):
        h = _splitmix(np.full_like(idx, np.uint64(seed & 0xFFFFFFFFFFFFFFFF)))
        h = _splitmix(h ^ np.uint64(view))
        h = _splitmix(h ^ idx)
        h = _splitmix(h ^ np.arange(num_draws, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_params(recipe: str, *, seed: int, view: int, indices: np.ndarray) -> np.ndarray:
    """Augmentation parameters of ``view`` for samples ``indices``: float32 ``[N, P]``."""
    info = recipe_info(recipe)
    u = uniform(seed, view, indices, info.num_params)
    if recipe == "digits":
        span = 2 * DIGITS_SHIFT + 1
        out = np.floor(u * span) - DIGITS_SHIFT
    elif recipe == "cifar":
        span = 2 * CIFAR_PAD + 1
        out = np.stack([np.floor(u[:, 0] * span), np.floor(u[:, 1] * span),
                        np.floor(u[:, 2] * 2)], axis=1)
    else:
        lo, hi = RRC_SCALE
        rlo, rhi = RRC_LOG_RATIO
        out = np.stack([lo + (hi - lo) * u[:, 0], rlo + (rhi - rlo) * u[:, 1], u[:, 2], u[:, 3],
                        np.floor(u[:, 4] * 2)], axis=1)
    return out.astype(np.float32)


def crop_box(params: np.ndarray | torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """imagenet recipe: (top, left, h, w) of the crop in a ``height`` x ``width`` image."""
    scale, log_ratio, u, v = (float(p) for p in params[:4])
    area = scale * height * width
    ratio = math.exp(log_ratio)
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = min(height - h, int(u * (height - h + 1)))
    left = min(width - w, int(v * (width - w + 1)))
    return top, left, h, w


def apply_batch(recipe: str, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Fixed-size recipes on a whole batch: ``[B, C, H, W]`` (any dtype) -> same shape.

    This is the single implementation for digits and cifar: :func:`apply` calls it with B=1, so a
    batch augmented on the GPU and a sample augmented in a DataLoader worker give identical pixels.
    """
    info = recipe_info(recipe)
    if not info.fixed_size:
        raise ValueError(f"recipe {recipe!r} changes the image size; use apply() per image")
    b, _, h, w = images.shape
    p = params.to(device=images.device, dtype=torch.long).reshape(b, info.num_params)
    pad = DIGITS_SHIFT if recipe == "digits" else CIFAR_PAD
    padded = F.pad(images, (pad, pad, pad, pad))
    if recipe == "digits":
        # Shift the content by (dx, dy): the crop starts at pad - d in the padded image.
        left, top = pad - p[:, 0], pad - p[:, 1]
        flip = torch.zeros(b, dtype=torch.bool, device=images.device)
    else:
        left, top, flip = p[:, 0], p[:, 1], p[:, 2].bool()
    rows = (top[:, None] + torch.arange(h, device=images.device)[None, :])  # [B, H]
    cols = (left[:, None] + torch.arange(w, device=images.device)[None, :])  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def apply(recipe: str, image: torch.Tensor, params: np.ndarray | torch.Tensor, *,
          size: int = 224) -> torch.Tensor:
    """Apply one view's parameters to one image ``[C, H, W]`` uint8 -> uint8 (``size`` for imagenet)."""
    params_t = torch.as_tensor(np.asarray(params, dtype=np.float32))
    info = recipe_info(recipe)
    if info.fixed_size:
        return apply_batch(recipe, image[None], params_t[None])[0]
    out = resized_crop(image, params_t, size=size)
    if params_t[4] >= 0.5:
        out = out.flip(-1)
    return out


def resized_crop(image: torch.Tensor, params: np.ndarray | torch.Tensor, *, size: int) -> torch.Tensor:
    """imagenet recipe before its flip: the :func:`crop_box` of ``params`` resized to ``size`` x ``size``
    (antialiased bilinear, on the image's device). Shared with ``device_decode.apply_batch_rrc``,
    which flips a whole batch at once."""
    top, left, h, w = crop_box(params, image.shape[-2], image.shape[-1])
    return TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)


def eval_transform(recipe: str, image: torch.Tensor, *, size: int = 224) -> torch.Tensor:
    """Deterministic test-time view: identity for fixed-size recipes, resize + centre crop for imagenet."""
    if recipe_info(recipe).fixed_size:
        return image
    resized = TF.resize(image, [round(size * 256 / 224)], antialias=True)
    return TF.center_crop(resized, [size, size])


def apply_views(recipe: str, images: torch.Tensor | list[torch.Tensor], params: np.ndarray | torch.Tensor, *,
                size: int = 224) -> torch.Tensor:
    """Each image's own params (one view per row) -> uint8 [n, C, h, w]: one ``apply_batch`` for a
    fixed-size recipe (what ``apply`` does per image), ``apply`` per image otherwise. ``images`` is a
    uint8 [n, C, H, W] tensor, or a list of [C, H, W] (of different sizes for imagenet)."""
    if recipe_info(recipe).fixed_size:
        stacked = images if isinstance(images, torch.Tensor) else torch.stack(images)
        return apply_batch(recipe, stacked, torch.as_tensor(np.asarray(params, dtype=np.float32)))
    return torch.stack([apply(recipe, img, p, size=size) for img, p in zip(images, params, strict=True)])


def eval_views(recipe: str, images: torch.Tensor | list[torch.Tensor], *, size: int = 224) -> torch.Tensor:
    """``eval_transform`` of every image -> uint8 [n, C, h, w] (the identity for fixed-size recipes)."""
    if recipe_info(recipe).fixed_size and isinstance(images, torch.Tensor):
        return images
    return torch.stack([eval_transform(recipe, img, size=size) for img in images])


@dataclass(frozen=True)
class Normalization:
    """A model's input normalisation: per-channel mean and std of pixels scaled to [0, 1].

    It belongs to the model, not to the data: a model trained here uses its recipe's dataset
    statistics, an imported one the statistics its weights were trained with (the published
    CIFAR-10 option-A ResNets use ImageNet's). The model card records it, and every place that
    feeds a model (teacher training, stage 1, verify-cache, the student, evaluation) normalises
    for that model, so a teacher and a student may differ.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of_recipe(cls, recipe: str) -> Normalization:
        info = recipe_info(recipe)
        return cls(info.mean, info.std)

    @classmethod
    def from_card(cls, card: dict) -> Normalization:
        """A model card's ``input_norm``; cards written before it existed used their recipe's statistics."""
        norm = card.get("input_norm")
        if norm is None:
            return cls.of_recipe(card["recipe"])
        return cls(tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"]))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 normalised with these statistics."""
        if images.shape[1] != len(self.mean):
            raise ValueError(f"input normalisation has {len(self.mean)} channel statistics but the images have "
                             f"{images.shape[1]} channels")
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def normalize(images: torch.Tensor, recipe: str) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 normalised with the recipe's channel statistics (the
    normalisation of every model trained here; imported models carry their own, see Normalization)."""
    return Normalization.of_recipe(recipe)(images)
