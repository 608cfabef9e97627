"""Image decoding and encoding with PIL, shared by prepare (verification) and readers.

One code path decodes at prepare time and at training time, so an image that passed
verification is guaranteed to decode later. Pixels are only converted to the wanted channel
count: no EXIF rotation, no colour management, no resizing (augmentation owns geometry).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.samples import ImageDecodeError

if TYPE_CHECKING:
    import torch

# Modes PIL converts to "L"/"RGB" faithfully; alpha is dropped, CMYK/YCbCr/P are mapped to RGB.
_CONVERTIBLE = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                          "YCbCr"})
# PIL names the formats whose bytes we keep as they are; MPO is a JPEG with extra APP segments.
_KEEP_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
# Formats PIL may open: those of torchvision's ImageFolder extensions. The JPEG plugin also
# opens MPO (a JPEG with extra APP segments, as cameras write them).
OPEN_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP")
# Stored-deflate PNG: decodes ~1.5x faster than level 6 for 32x32 images and its bytes do not
# depend on the zlib build, so shard hashes in a committed manifest reproduce across machines.
PNG_COMPRESS_LEVEL = 0


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def open_image(data: bytes, *, name: str) -> Image.Image:
    """Open and fully decode ``data``; any failure becomes an ImageDecodeError naming ``name``.

    Only the formats of ImageFolder's extensions are tried (no EPS/PDF plugins that shell out).
    Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) stays on; Pillow itself only
    warns between 1x and 2x the limit, which would go unnoticed in workers, so that band is an
    error here too (checked from the header, before any pixel buffer is allocated).
    """
    try:
        img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise Image.DecompressionBombError(
                f"Image size ({img.width * img.height} pixels) exceeds limit of {limit} pixels.")
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            f"{name}: refusing to decode a possible decompression bomb: {exc} Raise "
            "PIL.Image.MAX_IMAGE_PIXELS only if you trust this file.") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not a recognised image ({len(data)} bytes, starting "
                               f"{data[:8]!r}; formats tried: {', '.join(OPEN_FORMATS)}).") from exc
    # PIL's format plugins raise many exception types on malformed input (OSError for truncated
    # data, SyntaxError, struct.error, ValueError, ...); all of them mean "corrupt image" here.
    except Exception as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image: "
                               f"{type(exc).__name__}: {exc}") from exc
    return img


def image_to_array(img: Image.Image, *, channels: int, name: str) -> np.ndarray:
    """uint8 [H, W] (channels=1) or [H, W, 3] (channels=3) pixels of a decoded PIL image."""
    _check_channels(channels)
    mode = img.mode
    if mode.startswith("I;16"):
        # 16-bit greyscale (some PNG/TIFF): keep the high byte; PIL's convert("L") would clip.
        arr = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return arr if channels == 1 else np.repeat(arr[:, :, None], 3, axis=2)
    if mode not in _CONVERTIBLE:
        raise ImageDecodeError(f"{name}: unsupported pixel mode {mode!r}; expected one of "
                               f"{', '.join(sorted(_CONVERTIBLE))} or 16-bit greyscale.")
    target = "L" if channels == 1 else "RGB"
    if mode != target:
        img = img.convert(target)
    return np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy does not warn


def decode_array(data: bytes, *, channels: int, name: str) -> np.ndarray:
    """Decode image bytes to uint8 [H, W] or [H, W, 3] (see ``image_to_array``)."""
    _check_channels(channels)
    return image_to_array(open_image(data, name=name), channels=channels, name=name)


def decode_image(data: bytes, *, channels: int, name: str) -> torch.Tensor:
    """Decode image bytes to a uint8 tensor [C, H, W] with C = ``channels`` (1 or 3).

    Raises ImageDecodeError naming ``name`` for truncated or non-image bytes, unsupported pixel
    modes and images above Pillow's decompression-bomb limit.
    """
    import torch  # here, not at the top: reading manifests and labels (`aekt inspect`) needs no torch

    arr = decode_array(data, channels=channels, name=name)
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))  # [C, H, W]


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of uint8 pixels [H, W] (greyscale) or [H, W, 3] (RGB); deterministic bytes."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
            pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG",
                                                        compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def verify_for_storage(data: bytes, *, channels: int, name: str) -> tuple[bytes, str]:
    """Decode once to verify; return (bytes to store, ext).

    JPEG and PNG bytes are kept exactly (the extension follows the content, not the file name);
    other formats (BMP, WebP, TIFF, ...) are re-encoded losslessly as PNG of the wanted channels.
    """
    img = open_image(data, name=name)
    pixels = image_to_array(img, channels=channels, name=name)
    ext = _KEEP_FORMAT.get(img.format or "")
    if ext is not None:
        return data, ext
    return encode_png(pixels), "png"
