"""Decode and augment a batch of images on the compute device (GPU JPEG decode), or with PIL.

DESIGN.md ("Speed") measured PIL decode + RandomResizedCrop at ~280 ImageNet images/s per core, far
below a teacher's forward rate on a GPU. This module offers a second *decode path* with the same
replayable parameters, and one entry point both paths go through:

- ``"pil"``: today's path, on the CPU: :func:`pipeline.data.images.decode_image` (PIL) per image, then
  the crop/resize/flip of ``augment.apply`` (or ``augment.eval_transform``); the batch is moved to
  ``device`` at the end. Its pixels do not depend on ``device``.
- ``"device"``: :func:`decode_batch` decodes the JPEGs with ``torchvision.io.decode_jpeg`` on
  ``device`` (one batched nvJPEG call on CUDA, libjpeg-turbo on CPU), then :func:`apply_batch_rrc` /
  :func:`eval_batch` crop, resize and flip there. Other images (PNG, and JPEGs torchvision does not
  take: CMYK, 12-bit, arithmetic or lossless coding) go through PIL and are moved to the device, as
  does a JPEG the decoder refuses (logged): PIL verified every stored image at prepare time, so it
  decodes it or raises the ImageDecodeError naming it.

Wiring (stage 1, stage 2, verify-cache, evaluation): one call per batch, keys as names::

    images = decode_and_augment(datas, params, path=path, channels=manifest.channels, size=224,
                                device=device, names=keys, recipe=recipe)  # uint8 [B, C, 224, 224]
    # params: the stored [B, P] rows of the view; None for the deterministic test-time view

Stage 1 records ``pixel_source(path, device)`` in the store's provenance, and stage 2 (and
verify-cache) must get the same string for the path it is about to use, or refuse: the student
sees exactly the teacher's pixels only if both decoded and resized them with the same code on the
same kind of device. The images of one sample never depend on the rest of its batch (every image is
decoded and resized on its own, only batched for speed), so stage 2's shuffled batches replay stage
1's pixels exactly. In DataLoader workers call it with ``device=cpu``; either path then runs there.

Measured on the 623 real ImageNet JPEGs of imagenet-sample (torchvision 0.29.1, Pillow 13.0.0, CPU):
torchvision's decode equals PIL's bit for bit (RGB and, with the luma below, greyscale), and the
resize is the same torchvision kernel as ``augment.apply``, so on CPU ``"device"`` reproduces
``"pil"`` exactly; the tags still differ, because that equality rests on both libraries bundling
the same libjpeg-turbo build. On CUDA, nvJPEG decodes within a mean of 2 grey levels of libjpeg
(torchvision's own test bound) and the resize runs in float32 (within 1 level of the CPU's uint8
kernel): close to ``"pil"``, not equal, hence ``"device-cuda"``.

Decompression bombs: a JPEG's frame header (SOF) is read before any decoding, and an image above
``PIL.Image.MAX_IMAGE_PIXELS`` is refused as ``images.open_image`` refuses it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline import augment
from pipeline.data.images import decode_image
from pipeline.data.samples import ImageDecodeError

logger = logging.getLogger(__name__)

DECODE_PATHS = ("pil", "device")
JPEG_MAGIC = b"\xff\xd8\xff"  # SOI and the first byte of the next marker
# Frame (SOF) markers: C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Huffman-coded baseline, extended sequential and progressive: what libjpeg-turbo and nvJPEG both decode.
_DEVICE_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header (SOF) says about the image, read without decoding it."""

    marker: int  # 0xC0 baseline, 0xC2 progressive, ...
    precision: int  # bits per sample
    height: int  # 0 when a DNL marker defines it later
    width: int
    components: int  # 1 greyscale, 3 YCbCr/RGB, 4 CMYK/YCCK

    @property
    def device_decodable(self) -> bool:
        return (self.marker in _DEVICE_SOF_MARKERS and self.precision == 8 and self.components in (1, 3)
                and self.height > 0 and self.width > 0)


def pixel_source(path: str, device: torch.device | str) -> str:
    """The provenance tag of the pixels ``path`` produces on ``device``: "pil", "device-cpu", "device-cuda"."""
    check_path(path)
    return "pil" if path == "pil" else f"device-{torch.device(device).type}"


def check_path(path: str) -> None:
    if path not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {path!r}; valid: {', '.join(DECODE_PATHS)}")


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def read_jpeg_frame(data: bytes, *, name: str) -> JpegFrame:
    """The first frame header of JPEG ``data``, found by walking its marker segments (no pixel work).

    Raises ImageDecodeError naming ``name`` when the header is malformed or cut short.
    """
    pos, end = 2, len(data)
    while True:
        if pos + 4 > end:
            raise ImageDecodeError(f"{name}: truncated JPEG: no frame header (SOF) in its {end} bytes.")
        if data[pos] != 0xFF:
            raise ImageDecodeError(f"{name}: corrupt JPEG header: expected a marker at byte {pos}, "
                                   f"found 0x{data[pos]:02x}.")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise ImageDecodeError(f"{name}: corrupt JPEG header: marker 0x{marker:02x} before the frame "
                                   "header (SOF).")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            raise ImageDecodeError(f"{name}: truncated JPEG: segment 0x{marker:02x} at byte {pos} claims "
                                   f"{length} bytes, {end - pos - 2} left.")
        if marker in _SOF_MARKERS:
            if length < 8:
                raise ImageDecodeError(f"{name}: corrupt JPEG frame header: {length} bytes long.")
            return JpegFrame(marker=marker, precision=data[pos + 4],
                             height=int.from_bytes(data[pos + 5:pos + 7], "big"),
                             width=int.from_bytes(data[pos + 7:pos + 9], "big"), components=data[pos + 9])
        pos += 2 + length


def check_pixel_limit(frame: JpegFrame, *, name: str) -> None:
    """Refuse what ``images.open_image`` refuses: more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = frame.width * frame.height
    if limit and pixels > limit:
        raise ImageDecodeError(
            f"{name}: refusing to decode a possible decompression bomb: {frame.width}x{frame.height} = "
            f"{pixels} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS ({limit}). Raise PIL.Image.MAX_IMAGE_PIXELS "
            "only if you trust this file.")


def pil_luma(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] -> [1, H, W] with PIL's ``convert("L")`` arithmetic (ITU-R 601-2, 16-bit fixed point).

    A decoder's greyscale output (libjpeg's or nvJPEG's) is the JPEG's own Y plane, up to 26 levels
    off PIL's L on the imagenet-sample photos; converting decoded RGB with PIL's integers gives PIL's
    pixels exactly.
    """
    r, g, b = rgb.to(torch.int32).unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]


def _to_channels(rgb: torch.Tensor, components: int, channels: int) -> torch.Tensor:
    if components == 1:  # a greyscale JPEG: its one plane, repeated for RGB as PIL's L -> RGB does
        grey = rgb[:1]
        return grey if channels == 1 else grey.expand(3, -1, -1).contiguous()
    return rgb if channels == 3 else pil_luma(rgb)


def _torch_error(exc: Exception) -> str:
    # torchvision prefixes its C++ source location ("decode_jpeg, /path/decode_jpeg.cpp:171, ...").
    return re.sub(r"^.*?\.(?:cpp|cu|h):\d+, ", "", str(exc).splitlines()[0] if str(exc) else repr(exc))


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: no read-only warning


def _refused(name: str, decoder: str, exc: RuntimeError) -> None:
    # Shards hold only images PIL decoded at prepare time, so PIL gets the last word: it decodes the
    # image, or raises the ImageDecodeError naming it.
    logger.warning("%s: %s refused it (%s); decoding it with PIL instead", name, decoder, _torch_error(exc))


def _decode_jpeg_cpu(encoded: torch.Tensor, name: str) -> torch.Tensor | None:
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        return _refused(name, "libjpeg (torchvision)", exc)


def _decode_jpeg_cuda(encoded: torch.Tensor, name: str, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        return _refused(name, "nvJPEG", exc)


def decode_jpegs_rgb(datas: Sequence[bytes], *, device: torch.device,
                     names: Sequence[str]) -> list[torch.Tensor | None]:
    """Decode JPEGs to uint8 RGB [3, H, W]: one batched nvJPEG call on CUDA, libjpeg on the CPU
    otherwise; None where the decoder refuses an image (a failed batch is retried image by image)."""
    encoded = [_encoded(d) for d in datas]
    if device.type != "cuda":
        return [_decode_jpeg_cpu(e, n) for e, n in zip(encoded, names, strict=True)]
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return [_decode_jpeg_cuda(e, n, device) for e, n in zip(encoded, names, strict=True)]


def _check_batch(datas: Sequence[bytes], names: Sequence[str], channels: int) -> None:
    if len(names) != len(datas):
        raise ValueError(f"got {len(datas)} images but {len(names)} names; pass one name per image")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def decode_batch(datas: Sequence[bytes], *, channels: int, device: torch.device | str,
                 names: Sequence[str]) -> list[torch.Tensor]:
    """Decode encoded images to uint8 [C, H, W] tensors on ``device`` (C = ``channels``, 1 or 3).

    JPEGs that torchvision decodes go through ``decode_jpeg`` on ``device``; everything else, and any
    JPEG the decoder refuses, through PIL (``decode_image``), moved to ``device``. Raises
    ImageDecodeError naming the sample for corrupt or truncated bytes, non-images and images above
    ``PIL.Image.MAX_IMAGE_PIXELS`` (the last from the JPEG header, before decoding). Tensors keep the
    decoder's memory layout (libjpeg's is channels-last): the CPU's uint8 resize reads it directly,
    ~30 % faster than from a contiguous copy, and with the same values.
    """
    _check_batch(datas, names, channels)
    device = torch.device(device)
    frames: dict[int, JpegFrame] = {}  # the images decode_jpeg takes, by position
    for i, (data, name) in enumerate(zip(datas, names, strict=True)):
        if is_jpeg(data):
            frame = read_jpeg_frame(data, name=name)
            check_pixel_limit(frame, name=name)
            if frame.device_decodable:
                frames[i] = frame
    rgb = decode_jpegs_rgb([datas[i] for i in frames], device=device,
                           names=[names[i] for i in frames]) if frames else []
    out = {i: _to_channels(image.to(device), frame.components, channels)
           for (i, frame), image in zip(frames.items(), rgb, strict=True) if image is not None}
    return [out[i] if i in out else decode_image(data, channels=channels, name=name).to(device)
            for i, (data, name) in enumerate(zip(datas, names, strict=True))]


def _params_array(params: np.ndarray | torch.Tensor, rows: int, width: int) -> np.ndarray:
    arr = params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else np.asarray(params)
    if arr.shape != (rows, width):
        raise ValueError(f"expected augmentation params of shape ({rows}, {width}), got {tuple(arr.shape)}")
    return arr.astype(np.float32, copy=False)


def apply_batch_rrc(images: Sequence[torch.Tensor], params: np.ndarray | torch.Tensor, *,
                    size: int) -> torch.Tensor:
    """imagenet recipe on a batch: uint8 [C, H_i, W_i] images on one device -> uint8 [B, C, size, size].

    Each image is cropped and resized on its own device with ``augment.resized_crop`` (the kernel
    ``augment.apply`` uses: bit-identical on CPU, float32 on CUDA), the flips (params[:, 4] >= 0.5,
    as in ``augment.apply``) are applied to the whole batch at once.
    """
    if not images:
        raise ValueError("apply_batch_rrc needs at least one image")
    p = _params_array(params, len(images), augment.recipe_info("imagenet").num_params)
    views = torch.stack([augment.resized_crop(img, row, size=size) for img, row in zip(images, p, strict=True)])
    flip = torch.from_numpy(p[:, 4] >= 0.5).to(views.device)[:, None, None, None]
    return torch.where(flip, views.flip(-1), views)  # [B, C, size, size]


def eval_batch(images: Sequence[torch.Tensor], *, size: int) -> torch.Tensor:
    """imagenet test-time view of a batch (``augment.eval_transform`` per image): uint8 [B, C, size, size]."""
    if not images:
        raise ValueError("eval_batch needs at least one image")
    return torch.stack([augment.eval_transform("imagenet", img, size=size) for img in images])


def augment_images(recipe: str, images: Sequence[torch.Tensor], params: np.ndarray | torch.Tensor | None, *,
                   size: int) -> torch.Tensor:
    """One view of decoded images, on their device: ``params`` [B, P] rows, or None for the test-time view."""
    info = augment.recipe_info(recipe)
    if not info.fixed_size:
        return eval_batch(images, size=size) if params is None else apply_batch_rrc(images, params, size=size)
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        raise ValueError(f"recipe {recipe!r} needs images of one size, got {sorted(shapes)}")
    batch = torch.stack(list(images))  # [B, C, H, W]
    if params is None:
        return batch
    return augment.apply_batch(recipe, batch, torch.from_numpy(_params_array(params, len(images), info.num_params)))


def decode_and_augment(datas: Sequence[bytes], params: np.ndarray | torch.Tensor | None, *, path: str,
                       channels: int, size: int, device: torch.device | str, names: Sequence[str],
                       recipe: str = "imagenet") -> torch.Tensor:
    """Encoded images + their view's params -> the augmented uint8 batch [B, C, size, size] on ``device``.

    ``path`` is "pil" (decode and augment per image on the CPU, then move) or "device" (decode and
    augment on ``device``); see the module docstring. ``params`` None gives the test-time view.
    Fixed-size recipes (digits, cifar) keep their image size and ignore ``size``.
    """
    check_path(path)
    _check_batch(datas, names, channels)
    if not datas:
        raise ValueError("decode_and_augment needs at least one image")
    device = torch.device(device)
    if path == "pil":
        images = [decode_image(d, channels=channels, name=n) for d, n in zip(datas, names, strict=True)]
        return augment_images(recipe, images, params, size=size).to(device)
    images = decode_batch(datas, channels=channels, device=device, names=names)
    return augment_images(recipe, images, params, size=size)
