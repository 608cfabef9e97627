"""pipeline.data.images: channel conversion, no hidden transforms, storage format choice."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import ImageDecodeError, decode_image
from pipeline.data.images import encode_png, verify_for_storage

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_roundtrip_is_lossless_and_chw() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_image(encode_png(rgb), channels=3, name="x")
    assert out.dtype == torch.uint8 and out.shape == (3, 5, 7) and out.is_contiguous()
    assert np.array_equal(out.permute(1, 2, 0).numpy(), rgb)
    grey = rgb[:, :, 0]
    assert np.array_equal(decode_image(encode_png(grey), channels=1, name="x")[0].numpy(), grey)


def test_png_encoding_is_deterministic() -> None:
    rgb = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    assert encode_png(rgb) == encode_png(rgb.copy())


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK"])
def test_modes_convert_to_wanted_channels(mode: str) -> None:
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8))
    img = base.convert(mode)
    data = _encode(img, "JPEG" if mode == "CMYK" else "PNG")
    rgb, grey = decode_image(data, channels=3, name="m"), decode_image(data, channels=1, name="m")
    assert rgb.shape == (3, 6, 4) and grey.shape == (1, 6, 4)
    if mode == "L":  # grey replicated to three identical channels
        assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])
        assert torch.equal(grey[0], rgb[0])
    if mode == "RGBA":  # alpha dropped, colour untouched
        assert np.array_equal(rgb.permute(1, 2, 0).numpy(), np.asarray(base))


def test_16bit_grey_keeps_high_byte() -> None:
    values = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert decode_image(data, channels=1, name="d")[0, 0].tolist() == [0, 0, 1, 255]


def test_exif_orientation_is_not_applied() -> None:
    img = Image.fromarray(np.zeros((4, 8, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation tag
    out = decode_image(_encode(img, "JPEG", exif=exif), channels=3, name="e")
    assert out.shape == (3, 4, 8)


def test_storage_format_follows_content_not_name() -> None:
    png = encode_png(np.zeros((3, 3, 3), np.uint8))
    assert verify_for_storage(png, channels=3, name="mislabelled.JPEG") == (png, "png")
    jpeg = _encode(Image.new("RGB", (3, 3)), "JPEG")
    assert verify_for_storage(jpeg, channels=3, name="a.jpg") == (jpeg, "jpg")
    bmp = _encode(Image.new("RGB", (3, 2), (10, 20, 30)), "BMP")
    stored, ext = verify_for_storage(bmp, channels=3, name="a.bmp")
    assert ext == "png" and decode_image(stored, channels=3, name="a")[:, 0, 0].tolist() == [10, 20,
                                                                                          30]


def test_unsupported_mode_is_an_error() -> None:
    data = _encode(Image.new("F", (2, 2)), "TIFF")
    with pytest.raises(ImageDecodeError, match=r"f\.tif: unsupported pixel mode 'F'"):
        decode_image(data, channels=3, name="f.tif")


def test_bad_channel_count() -> None:
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(b"", channels=4, name="x")


@pytest.mark.skipif(not (DATA / "imagenet-sample" / "val.tar").exists(),
                    reason="shared/data/imagenet-sample absent")
def test_real_imagenet_jpegs_including_greyscale() -> None:
    grey, colour = [], []
    with tarfile.open(DATA / "imagenet-sample" / "val.tar") as tar:
        for info in tar:
            if not info.isfile():
                continue
            data = tar.extractfile(info).read()
            # Image.open parses headers only, so finding the grey ones stays cheap.
            is_grey = Image.open(io.BytesIO(data)).mode == "L"
            if is_grey and len(grey) < 3:
                grey.append((info.name, data))
            elif not is_grey and len(colour) < 3:
                colour.append((info.name, data))
            if len(grey) == 3 and len(colour) == 3:
                break
    assert len(grey) == 3
    for name, data in grey + colour:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
        rgb = decode_image(data, channels=3, name=name)
        assert rgb.shape == (3, h, w) and rgb.dtype == torch.uint8
        assert verify_for_storage(data, channels=3, name=name) == (data, "jpg")
    name, data = grey[0]
    rgb = decode_image(data, channels=3, name=name)
    assert torch.equal(rgb[0], rgb[2])
    assert torch.equal(decode_image(data, channels=1, name=name)[0], rgb[0])
