"""Decode + augment throughput on real ImageNet JPEGs: PIL + augment.apply (today) vs the device path.

The first N JPEGs of the imagenet-sample tar (real full-size ImageNet images, see shared/data/SOURCES.md)
go through ``pipeline.device_decode.decode_and_augment`` in batches, with the imagenet recipe's params
of view 0, per round side by side on one process and one device:

- ``pil``: path "pil": PIL decode + crop/resize/flip per image on the CPU, batch moved to the device;
- ``device``: path "device": ``torchvision.io.decode_jpeg`` on the device (one nvJPEG call per batch
  on CUDA, libjpeg-turbo on CPU) + ``apply_batch_rrc`` on the device.

Their halves are timed the same way (decode alone, augment alone from already decoded images), and
the two paths' outputs are compared pixel by pixel. Usage::

    python -m bench.decode                        # CPU: 256 images, batch 64, 3 rounds (~1 min)
    python -m bench.decode --device cpu --quick   # 32 images, 1 round
    python -m bench.decode --device cuda --images 623 --batch 256
"""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    REPO,
    SHARED_DATA,
    base_parser,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    paired_ratio,
    prepare_run,
    profile_top,
    summary,
)
from pipeline import augment
from pipeline.data.images import decode_image
from pipeline.device_decode import apply_batch_rrc, decode_and_augment, decode_batch, read_jpeg_frame

NAME = "decode"
SAMPLE_TAR = Path("shared") / "data" / "imagenet-sample" / "val.tar"
PAIRS = (("pil", "device"), ("decode_pil", "decode_device"), ("augment_pil", "augment_device"))


def default_tar() -> Path:
    """The sample tar beside the checkout (``../shared``) or inside it (a device machine's copy)."""
    for path in (SHARED_DATA / "imagenet-sample" / "val.tar", REPO / SAMPLE_TAR, REPO.parent / SAMPLE_TAR):
        if path.is_file():
            return path
    raise SystemExit(f"{SAMPLE_TAR} not found under {REPO} or {REPO.parent}; pass --tar PATH")


def load_jpegs(tar_path: Path, count: int) -> tuple[list[bytes], list[str]]:
    """The first ``count`` files of the tar, in member order: (bytes, member names)."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:count]
        return [tar.extractfile(m).read() for m in members], [m.name for m in members]  # type: ignore[union-attr]


def _batches(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def make_cases(datas: list[bytes], names: list[str], params: np.ndarray, *, batch: int, size: int,
               channels: int, device: torch.device) -> dict[str, Callable[[], int]]:
    """The six timed cases; each processes every image once and returns the count."""
    spans, n = _batches(len(datas), batch), len(datas)
    pil_images = [decode_image(d, channels=channels, name=k) for d, k in zip(datas, names, strict=True)]
    dev_images = decode_batch(datas, channels=channels, device=device, names=names)

    def full(path: str) -> int:
        for s in spans:
            decode_and_augment(datas[s], params[s], path=path, channels=channels, size=size, device=device,
                               names=names[s])
        return n

    def decode_pil() -> int:
        for d, k in zip(datas, names, strict=True):
            decode_image(d, channels=channels, name=k)
        return n

    def decode_device() -> int:
        for s in spans:
            decode_batch(datas[s], channels=channels, device=device, names=names[s])
        return n

    def augment_on(images: list[torch.Tensor]) -> int:
        for s in spans:
            apply_batch_rrc(images[s], params[s], size=size)
        return n

    return {"pil": lambda: full("pil"), "device": lambda: full("device"), "decode_pil": decode_pil,
            "decode_device": decode_device, "augment_pil": lambda: augment_on(pil_images),
            "augment_device": lambda: augment_on(dev_images)}


def compare_paths(datas: list[bytes], names: list[str], params: np.ndarray, *, size: int, channels: int,
                  device: torch.device) -> dict[str, float]:
    """Max and mean |pil - device| over the augmented outputs (grey levels), on the first batch."""
    pil, dev = (decode_and_augment(datas, params, path=p, channels=channels, size=size, device=device, names=names)
                for p in ("pil", "device"))
    diff = (pil.int() - dev.int()).abs()
    return {"max_abs": int(diff.max()), "mean_abs": float(diff.float().mean()),
            "fraction_differing": float((diff > 0).float().mean())}


def run(*, device: str = "cpu", images: int = 256, batch: int = 64, size: int = 224, channels: int = 3,
        rounds: int = 3, threads: int | None = None, tar: Path | None = None,
        profile: bool = False) -> dict[str, Any]:
    dev, _ = prepare_run(device, threads, "no")
    tar_path = tar if tar is not None else default_tar()
    datas, names = load_jpegs(tar_path, images)
    params = augment.sample_params("imagenet", seed=0, view=0, indices=np.arange(len(datas)))
    # Also the warm-up: lazy initialisation (nvJPEG handle, CUDA allocator) stays outside the clock.
    pixels = compare_paths(datas[:batch], names[:batch], params[:batch], size=size, channels=channels, device=dev)
    cases = make_cases(datas, names, params, batch=batch, size=size, channels=channels, device=dev)
    rates = interleaved(cases, rounds=rounds, device=dev)
    frames = [read_jpeg_frame(d, name=k) for d, k in zip(datas, names, strict=True)]
    payload: dict[str, Any] = {
        "benchmark": NAME, "machine": machine_info(dev),
        "config": {"tar": str(tar_path), "images": len(datas), "batch": batch, "size": size, "channels": channels,
                   "rounds": rounds, "recipe": "imagenet", "seed": 0, "view": 0,
                   "mean_jpeg_bytes": float(np.mean([len(d) for d in datas])),
                   "mean_megapixels": float(np.mean([f.width * f.height / 1e6 for f in frames]))},
        "images_per_s": {name: summary(r) for name, r in rates.items()},
        "ratios": {f"{b}/{a}": paired_ratio(rates[b], rates[a]) for a, b in PAIRS},
        "pil_vs_device_pixels": pixels}
    if profile:
        payload["profile_device"] = profile_top(cases["device"])
    return payload


def table(p: dict[str, Any]) -> str:
    rates, ratios = p["images_per_s"], p["ratios"]
    rows = [[label, rates[a]["median"], rates[b]["median"], ratios[f"{b}/{a}"]["median"]]
            for label, (a, b) in zip(("decode + augment", "decode only", "augment only"), PAIRS, strict=True)]
    cfg, px = p["config"], p["pil_vs_device_pixels"]
    return (f"decode on {p['machine']['device_name']}: {cfg['images']} imagenet-sample JPEGs "
            f"(mean {cfg['mean_jpeg_bytes'] / 1e3:.0f} KB, {cfg['mean_megapixels']:.2f} MP) -> "
            f"{cfg['channels']}x{cfg['size']}x{cfg['size']}, batch {cfg['batch']}, images/s per process, "
            f"median of {cfg['rounds']} rounds; pil vs device pixels: max |diff| {px['max_abs']}, "
            f"mean {px['mean_abs']:.3g}\n"
            + format_table(["stage", "pil path", "device path", "device/pil"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="JPEGs read from the tar (623 in all)")
    parser.add_argument("--batch", type=int, default=64, help="images per decode_and_augment call")
    parser.add_argument("--size", type=int, default=224, help="output side (the imagenet recipe's crop)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--tar", type=Path, default=None, help=f"imagenet-sample tar (default: {SAMPLE_TAR} "
                                                               "beside or inside the checkout)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults of 32 images, batch 16, 1 round: the path end to end in seconds")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:  # new defaults, so flags given beside --quick still win
        parser.set_defaults(images=32, batch=16, rounds=1)
    args = parser.parse_args(argv)
    payload = run(device=args.device, images=args.images, batch=args.batch, size=args.size, channels=args.channels,
                  rounds=args.rounds, threads=args.threads, tar=args.tar, profile=args.profile)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
