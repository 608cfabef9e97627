"""pipeline.device_decode on real ImageNet JPEGs: decode parity with PIL, RRC parity with augment.apply,
exact replay per path, errors naming the sample, fallbacks; a CUDA-vs-CPU check when a GPU is present.

Tolerances, measured on all 623 imagenet-sample JPEGs (torchvision 0.29.1, Pillow 13.0.0, CPU):
- torchvision (libjpeg-turbo) vs PIL decode: max |diff| 0, mean 0, for RGB and for greyscale (with
  ``pil_luma``); asserted with a margin (max <= 2, mean <= 0.05) so a libjpeg-turbo upgrade that moves
  a rounding does not fail it, while the Y plane PIL does not use (up to 26 levels off) does.
- RRC on the images' device vs ``augment.apply``: identical on CPU (the same kernel); asserted exact.
  The float32 resize CUDA runs differs from the CPU's uint8 kernel by at most 1 level (on ~16 % of
  pixels, mean 0.16, 600 crops): asserted here on CPU, and CUDA vs CPU in the gpu test.
- CUDA (nvJPEG) vs CPU decode: mean |diff| < 2 per image, torchvision's own test bound (not measured
  here: this machine has no GPU).
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline import augment, device_decode
from pipeline.data import ImageDecodeError, decode_image
from pipeline.data.images import encode_png
from pipeline.device_decode import (
    DECODE_PATHS,
    apply_batch_rrc,
    decode_and_augment,
    decode_batch,
    eval_batch,
    pil_luma,
    pixel_source,
    read_jpeg_frame,
)

DECODE_MAX_ABS = 2  # measured 0
DECODE_MEAN_ABS = 0.05  # measured 0.0
CUDA_DECODE_MEAN_ABS = 2.0  # torchvision's test_decode_jpegs_cuda bound
GREY_MEMBERS = ("val/n02096051/n02096051_Airedale.JPEG", "val/n02692877/n02692877_airship.JPEG")
CPU = torch.device("cpu")
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; the module still uses them.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def jpegs(shared_data: Path) -> dict[str, bytes]:
    """26 real ImageNet JPEGs: every 26th class (sizes 75-2400 px wide) plus two greyscale ones."""
    with tarfile.open(shared_data / "imagenet-sample" / "val.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        chosen = members[::26] + [m for m in members if m.name in GREY_MEMBERS]
        return {m.name: tar.extractfile(m).read() for m in chosen}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def rgb_images(jpegs: dict[str, bytes]) -> list[torch.Tensor]:
    return decode_batch(list(jpegs.values()), channels=3, device=CPU, names=list(jpegs))


def _params(n: int, view: int = 0) -> np.ndarray:
    return augment.sample_params("imagenet", seed=3, view=view, indices=np.arange(n))


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.cpu().int() - b.cpu().int()).abs()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


# ---- (a) decode parity ---------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
def test_torchvision_decode_matches_pil(jpegs: dict[str, bytes], channels: int) -> None:
    names = list(jpegs)
    decoded = decode_batch(list(jpegs.values()), channels=channels, device=CPU, names=names)
    for name, image in zip(names, decoded, strict=True):
        ref = decode_image(jpegs[name], channels=channels, name=name)
        assert image.dtype == torch.uint8 and image.device == CPU
        d = _diff(image, ref)
        assert d.max() <= DECODE_MAX_ABS and d.float().mean() <= DECODE_MEAN_ABS, name


def test_the_jpeg_y_plane_is_not_pils_grey(jpegs: dict[str, bytes]) -> None:
    # Why decode_batch converts RGB with PIL's integers instead of asking the decoder for grey:
    # the tolerance above would catch the Y plane.
    worst = max(_diff(decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.GRAY),
                      decode_image(d, channels=1, name=n)).max().item() for n, d in jpegs.items())
    assert worst > DECODE_MAX_ABS


def test_pil_luma_is_pils_grey_conversion_exactly() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, :8] = [[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)]  # the extremes
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(pil_luma(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy(), want)


def test_greyscale_jpeg_as_rgb_and_rgb_jpeg_as_grey(jpegs: dict[str, bytes]) -> None:
    grey_name, rgb_name = GREY_MEMBERS[0], next(n for n in jpegs if n not in GREY_MEMBERS)
    assert read_jpeg_frame(jpegs[grey_name], name=grey_name).components == 1
    [as_rgb] = decode_batch([jpegs[grey_name]], channels=3, device=CPU, names=[grey_name])
    assert as_rgb.shape[0] == 3 and torch.equal(as_rgb[0], as_rgb[1]) and torch.equal(as_rgb[1], as_rgb[2])
    assert _diff(as_rgb, decode_image(jpegs[grey_name], channels=3, name=grey_name)).max() <= DECODE_MAX_ABS
    [as_grey] = decode_batch([jpegs[rgb_name]], channels=1, device=CPU, names=[rgb_name])
    assert as_grey.shape[0] == 1
    assert _diff(as_grey, decode_image(jpegs[rgb_name], channels=1, name=rgb_name)).max() <= DECODE_MAX_ABS


def test_frame_header_gives_the_size_without_decoding(jpegs: dict[str, bytes]) -> None:
    for name, data in jpegs.items():
        frame = read_jpeg_frame(data, name=name)
        with Image.open(io.BytesIO(data)) as img:
            assert (frame.width, frame.height) == img.size and frame.precision == 8
            assert frame.components == (1 if img.mode == "L" else 3) and frame.device_decodable


# ---- (b) RRC parity ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [224, 96])
def test_rrc_matches_augment_apply_exactly(rgb_images: list[torch.Tensor], size: int) -> None:
    images = rgb_images
    for view in (0, 1):
        params = _params(len(images), view)
        assert 0 < params[:, 4].sum() < len(images)  # both flip branches exercised
        batch = apply_batch_rrc(images, torch.from_numpy(params), size=size)
        assert batch.shape == (len(images), 3, size, size) and batch.dtype == torch.uint8
        for i, (image, row) in enumerate(zip(images, params, strict=True)):
            assert torch.equal(batch[i], augment.apply("imagenet", image, row, size=size)), (view, i)


def test_eval_batch_matches_eval_transform(rgb_images: list[torch.Tensor]) -> None:
    images = rgb_images[::2]
    batch = eval_batch(images, size=224)
    for i, image in enumerate(images):
        assert torch.equal(batch[i], augment.eval_transform("imagenet", image, size=224))


def test_float_resize_the_gpu_runs_is_within_one_level(rgb_images: list[torch.Tensor]) -> None:
    # CUDA has no uint8 antialiased resize: torchvision resizes in float32 and rounds. The same
    # arithmetic on CPU bounds the device-vs-CPU RRC difference asserted on a GPU below.
    images = rgb_images[:12]
    params = _params(len(images))
    exact = apply_batch_rrc(images, params, size=224)
    as_float = apply_batch_rrc([im.float() for im in images], params, size=224).round().to(torch.uint8)
    d = _diff(exact, as_float)
    assert d.max() <= 1 and 0 < d.float().mean() < 0.3


# ---- (c) replay ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_replay_is_exact_and_independent_of_the_batch(jpegs: dict[str, bytes], path: str) -> None:
    names, datas = list(jpegs)[:12], list(jpegs.values())[:12]
    params = _params(len(datas))
    first = decode_and_augment(datas, params, path=path, channels=3, size=128, device=CPU, names=names)
    again = decode_and_augment(datas, params, path=path, channels=3, size=128, device=CPU, names=names)
    assert torch.equal(first, again)
    # Stage 2 batches differently from stage 1: a sample's pixels must not depend on its neighbours.
    order = np.random.default_rng(0).permutation(len(datas))[: len(datas) // 2]
    shuffled = decode_and_augment([datas[i] for i in order], params[order], path=path, channels=3, size=128,
                                  device=CPU, names=[names[i] for i in order])
    assert torch.equal(shuffled, first[torch.from_numpy(order)])


def test_paths_agree_within_the_decode_tolerance(jpegs: dict[str, bytes]) -> None:
    names, datas = list(jpegs)[:8], list(jpegs.values())[:8]
    params = _params(len(datas))
    pil, dev = (decode_and_augment(datas, params, path=p, channels=3, size=128, device=CPU, names=names)
                for p in DECODE_PATHS)
    assert _diff(pil, dev).max() <= DECODE_MAX_ABS
    want = eval_batch([decode_image(d, channels=1, name=n) for n, d in zip(names, datas, strict=True)], size=128)
    for p in DECODE_PATHS:  # params None: the test-time view
        got = decode_and_augment(datas, None, path=p, channels=1, size=128, device=CPU, names=names)
        assert got.shape == (8, 1, 128, 128) and _diff(got, want).max() <= DECODE_MAX_ABS


def test_fixed_size_recipe_goes_through_the_same_function(shared_data: Path) -> None:
    datas, names = [], []
    with tarfile.open(shared_data / "cifar10-images" / "test.tar") as tar:
        for member in tar:  # the first 16 files, without indexing all 10,000 members
            if member.isfile():
                datas.append(tar.extractfile(member).read())  # type: ignore[union-attr]
                names.append(member.name)
            if len(datas) == 16:
                break
    params = augment.sample_params("cifar", seed=0, view=0, indices=np.arange(16))
    want = torch.stack([augment.apply("cifar", decode_image(d, channels=3, name=n), p)
                        for d, n, p in zip(datas, names, params, strict=True)])
    for path in DECODE_PATHS:
        got = decode_and_augment(datas, params, path=path, channels=3, size=224, device=CPU, names=names,
                                 recipe="cifar")
        assert got.shape == (16, 3, 32, 32) and _diff(got, want).max() <= DECODE_MAX_ABS


# ---- (d) errors and fallbacks --------------------------------------------------------------------
def _corruptions(data: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"scan cut in half": data[: len(data) // 2],
            "header cut": data[:120],
            "soi then garbage": data[:3] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
            "not an image": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()}


@pytest.mark.parametrize("kind", ["scan cut in half", "header cut", "soi then garbage", "not an image"])
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_corrupt_image_names_the_sample(jpegs: dict[str, bytes], kind: str, path: str) -> None:
    names, datas = list(jpegs)[:4], list(jpegs.values())[:4]
    datas[2] = _corruptions(datas[2])[kind]
    bad = "key-0000002"
    names[2] = bad
    with pytest.raises(ImageDecodeError, match=rf"^{re.escape(bad)}: (corrupt|truncated|not a recognised)"):
        decode_and_augment(datas, _params(4), path=path, channels=3, size=64, device=CPU, names=names)


def test_an_image_the_decoder_refuses_goes_to_pil(jpegs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    names, datas = list(jpegs)[:3], list(jpegs.values())[:3]
    refused, real = torch.frombuffer(bytearray(datas[1]), dtype=torch.uint8), device_decode.decode_jpeg

    def picky(data: torch.Tensor, **kw) -> torch.Tensor:
        if torch.equal(data, refused):
            raise RuntimeError("decode_jpeg, /src/decode_jpeg.cpp:171, Unsupported marker type 0xf7")
        return real(data, **kw)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky)
    with caplog.at_level(logging.WARNING, logger="pipeline.device_decode"):
        out = decode_batch(datas, channels=3, device=CPU, names=names)
    assert torch.equal(out[1], decode_image(datas[1], channels=3, name=names[1]))
    assert f"{names[1]}: libjpeg (torchvision) refused it (Unsupported marker type 0xf7); decoding it with PIL" \
        in caplog.text and names[0] not in caplog.text


def test_decompression_bomb_refused_from_the_header(jpegs: dict[str, bytes],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    name, data = next(iter(jpegs.items()))
    frame = read_jpeg_frame(data, name=name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", frame.width * frame.height - 1)
    with pytest.raises(ImageDecodeError, match=rf"^{re.escape(name)}: refusing .* decompression bomb"):
        decode_batch([data], channels=3, device=CPU, names=[name])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", frame.width * frame.height)
    assert decode_batch([data], channels=3, device=CPU, names=[name])[0].shape[1:] == (frame.height, frame.width)


def test_forged_huge_frame_is_refused_before_any_decoding() -> None:
    # SOI, then a baseline SOF claiming 65535 x 65535 x 3 and nothing else: were it decoded, the
    # error would be "truncated"; refusing it from the header says "decompression bomb".
    sof = b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    with pytest.raises(ImageDecodeError, match=r"^forged: refusing .* 65535x65535"):
        decode_batch([b"\xff\xd8" + sof], channels=3, device=CPU, names=["forged"])


def test_png_and_cmyk_go_through_pil(jpegs: dict[str, bytes]) -> None:
    name, data = next(iter(jpegs.items()))
    rgb = decode_image(data, channels=3, name=name)
    png = encode_png(rgb.permute(1, 2, 0).numpy())
    cmyk = _jpeg(Image.fromarray(rgb.permute(1, 2, 0).numpy()).convert("CMYK"))
    assert not read_jpeg_frame(cmyk, name="cmyk").device_decodable  # 4 components: torchvision not asked
    out = decode_batch([png, data, cmyk], channels=3, device=CPU, names=["png", name, "cmyk"])
    assert torch.equal(out[0], rgb)
    assert torch.equal(out[2], decode_image(cmyk, channels=3, name="cmyk"))
    assert torch.equal(decode_batch([png], channels=1, device=CPU, names=["png"])[0],
                       decode_image(png, channels=1, name="png"))


def test_exif_orientation_is_not_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": PIL's path ignores it, so must this one
    data = _jpeg(Image.fromarray(np.zeros((4, 8, 3), np.uint8)), exif=exif)
    assert decode_batch([data], channels=3, device=CPU, names=["e"])[0].shape == (3, 4, 8)


def test_bad_arguments_say_what_is_wrong(jpegs: dict[str, bytes]) -> None:
    datas = list(jpegs.values())[:2]
    with pytest.raises(ValueError, match="2 images but 1 names"):
        decode_batch(datas, channels=3, device=CPU, names=["a"])
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_batch(datas, channels=4, device=CPU, names=["a", "b"])
    with pytest.raises(ValueError, match="unknown decode path 'gpu'; valid: pil, device"):
        decode_and_augment(datas, _params(2), path="gpu", channels=3, size=64, device=CPU, names=["a", "b"])
    with pytest.raises(ValueError, match=r"params of shape \(2, 5\), got \(3, 5\)"):
        decode_and_augment(datas, _params(3), path="device", channels=3, size=64, device=CPU, names=["a", "b"])


def test_pixel_source_tags_say_path_and_device() -> None:
    assert pixel_source("pil", "cpu") == pixel_source("pil", torch.device("cuda")) == "pil"
    assert pixel_source("device", "cpu") == "device-cpu"
    assert pixel_source("device", torch.device("cuda", 1)) == "device-cuda"


# ---- (e) CUDA ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_replays(jpegs: dict[str, bytes]) -> None:
    cuda = torch.device("cuda")
    names, datas = list(jpegs), list(jpegs.values())
    for channels in (3, 1):
        on_gpu = decode_batch(datas, channels=channels, device=cuda, names=names)
        on_cpu = decode_batch(datas, channels=channels, device=CPU, names=names)
        for name, g, c in zip(names, on_gpu, on_cpu, strict=True):
            assert g.device.type == "cuda" and g.dtype == torch.uint8
            assert _diff(g, c).float().mean() < CUDA_DECODE_MEAN_ABS, name
    cpu_images = decode_batch(datas, channels=3, device=CPU, names=names)
    params = _params(len(datas))
    rrc_gpu = apply_batch_rrc([im.to(cuda) for im in cpu_images], params, size=224)
    assert _diff(rrc_gpu, apply_batch_rrc(cpu_images, params, size=224)).max() <= 1
    run = [decode_and_augment(datas, params, path="device", channels=3, size=224, device=cuda, names=names)
           for _ in range(2)]
    assert torch.equal(run[0], run[1])
    order = np.arange(len(datas))[::-1].copy()
    shuffled = decode_and_augment([datas[i] for i in order], params[order], path="device", channels=3, size=224,
                                  device=cuda, names=[names[i] for i in order])
    assert torch.equal(shuffled, run[0][torch.from_numpy(order).to(cuda)])
    truncated = datas[:3] + [datas[3][: len(datas[3]) // 2]]
    try:  # nvJPEG may or may not notice a cut scan; when anything fails, the error names the sample
        decode_batch(truncated, channels=3, device=cuda, names=names[:4])
    except ImageDecodeError as exc:
        assert str(exc).startswith(names[3])
