"""Image decoding and encoding with PIL, shared by prepare (verification) and readers.

One code path decodes at prepare time and at training time, so an image that passed
verification is guaranteed to decode later. Pixels are only converted to the wanted channel
count: no EXIF rotation, no colour management, no resizing (augmentation owns geometry).
"""

from __future__ import annotations

import ast
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
    if data.startswith(NPY_MAGIC):
        pixels = np.array(npy_pixels(data, channels=channels, name=name))  # writable, like PIL's
        return pixels[:, :, 0] if channels == 1 else pixels
    return image_to_array(open_image(data, name=name), channels=channels, name=name)


def decode_image(data: bytes, *, channels: int, name: str) -> torch.Tensor:
    """Decode image bytes to a uint8 tensor [C, H, W] with C = ``channels`` (1 or 3).

    Raw ``.npy`` pixels (``data.format: raw``) are copied, not decoded. Raises ImageDecodeError
    naming ``name`` for truncated or non-image bytes, unsupported pixel modes and images above
    Pillow's decompression-bomb limit.
    """
    import torch  # here, not at the top: reading manifests and labels (`aekt inspect`) needs no torch

    arr = hwc(decode_array(data, channels=channels, name=name))
    chw = arr.transpose(2, 0, 1)
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


# Raw pixels: a shard member ``<key>.npy`` holds a NumPy v1.0 file of uint8 [H, W, C] pixels, C-order.
# Any NumPy or WebDataset reader opens it (`np.load(..., allow_pickle=False)`); ours only checks the
# header against the manifest's shape and takes the pixels with ``frombuffer``, so a training read
# is a copy, not a decode. The header is written by hand so its bytes never depend on NumPy's version.
NPY_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The NumPy format-1.0 header of a C-order uint8 array of ``shape``, padded to 64 bytes."""
    dims = ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "")
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({dims}), }}"
    pad = -(len(NPY_MAGIC) + 2 + len(text) + 1) % 64
    text = text + " " * pad + "\n"
    return NPY_MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


def hwc(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> [H, W, C] (greyscale gets a channel axis of 1)."""
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def encode_npy(pixels: np.ndarray) -> bytes:
    """Raw ``.npy`` bytes of uint8 pixels [H, W] or [H, W, C] (stored as [H, W, C])."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"expected uint8 [H, W] or [H, W, C], got {pixels.dtype} {pixels.shape}")
    arr = np.ascontiguousarray(hwc(pixels))
    return npy_header(arr.shape) + arr.tobytes()


def npy_shape(data: bytes, *, name: str) -> tuple[int, int, int]:
    """The [H, W, C] shape of raw ``.npy`` pixel bytes, read from its header without unpickling
    anything; ImageDecodeError for another dtype, Fortran order, rank, or a size mismatch."""
    if not data.startswith(NPY_MAGIC) or len(data) < 10:
        raise ImageDecodeError(f"{name}: not a NumPy v1.0 .npy file ({len(data)} bytes, starting {data[:8]!r}).")
    end = 10 + int.from_bytes(data[8:10], "little")
    try:
        header = ast.literal_eval(data[10:end].decode("latin1"))  # a dict literal: nothing is executed
        shape = tuple(header["shape"])
        ok = header["descr"] == "|u1" and header["fortran_order"] is False and len(shape) == 3
    except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ImageDecodeError(f"{name}: corrupt .npy header: {exc}") from exc
    if not ok or not all(isinstance(d, int) and d > 0 for d in shape) or shape[2] not in (1, 3):
        raise ImageDecodeError(f"{name}: .npy pixels must be C-order uint8 [H, W, 1|3], got {header}.")
    if len(data) - end != shape[0] * shape[1] * shape[2]:
        raise ImageDecodeError(f"{name}: .npy of shape {shape} needs {int(np.prod(shape))} pixel bytes, "
                               f"holds {len(data) - end}: truncated or corrupt.")
    return shape  # type: ignore[return-value]


def npy_pixels(data: bytes, *, channels: int, name: str) -> np.ndarray:
    """uint8 [H, W, C] pixels of raw ``.npy`` bytes (read-only view); C must equal ``channels``."""
    shape = npy_shape(data, name=name)
    if shape[2] != channels:
        raise ImageDecodeError(f"{name}: raw pixels have {shape[2]} channels, the dataset {channels}; the "
                               "shard does not belong to this dataset: rerun `aekt prepare`.")
    return np.frombuffer(data, dtype=np.uint8, offset=len(data) - int(np.prod(shape))).reshape(shape)


def decode_stack(datas: list[bytes], *, channels: int, names: list[str]) -> torch.Tensor | list[torch.Tensor]:
    """Decode many images: one uint8 tensor [n, C, H, W] when they share a size, else a list of [C, H, W].

    Raw ``.npy`` members of one shape (what ``data.format: raw`` writes) take the fast path: the
    headers are compared once and all pixels are copied in one ``frombuffer``; nothing is decoded.
    """
    import torch

    if datas and all(d.startswith(NPY_MAGIC) for d in datas):
        first = datas[0]
        shape = npy_shape(first, name=names[0])
        head = len(first) - int(np.prod(shape))
        if all(len(d) == len(first) and d[:head] == first[:head] for d in datas):
            npy_pixels(first, channels=channels, name=names[0])  # the channel check, once
            flat = np.frombuffer(b"".join(d[head:] for d in datas), dtype=np.uint8)
            # np.array: one copy into a writable [n, C, H, W] (the joined bytes are read-only)
            return torch.from_numpy(np.array(flat.reshape(len(datas), *shape).transpose(0, 3, 1, 2), order="C"))
    images = [decode_image(d, channels=channels, name=n) for d, n in zip(datas, names, strict=True)]
    if images and all(im.shape == images[0].shape for im in images):
        return torch.stack(images)
    return images
