"""Stage-1 teacher precision: how far bf16 / fp16 autocast logits are from fp32, and at what speed.

The real published CIFAR-10 ResNets (``../shared/data/cifar10-resnets``, option-A shortcuts, the
normalisation they were trained with) run over real CIFAR-10 test images, augmented with the cifar
recipe's views, in fp32 and under autocast. Reported per precision: KL(fp32 || low) at tau = 1 and 4
(mean, p99, max), max |delta logit|, top-1 agreement, and forward images/s relative to fp32 measured
side by side. ``aekt verify-cache`` recomputes in fp32, so a store built with
``cache.mixed_precision: bf16`` must be judged with this gap added to its codec's bound
(``pipeline.cache.verify.PRECISION_KL_TOLERANCE``). Usage::

    python -m bench.precision                      # CPU: resnet20 + resnet56, 512 images
    python -m bench.precision --device cuda --samples 10000 --batch 1024
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    SHARED_DATA,
    base_parser,
    csv_strs,
    finish_cli,
    format_table,
    interleaved,
    machine_info,
    memory_format,
    paired_ratio,
    prepare_run,
    summary,
)
from pipeline import augment
from pipeline.cache.verify import PRECISION_KL_TOLERANCE, kl_at
from pipeline.cache.writer import ShardSource, teacher_logits
from pipeline.config import DataConfig
from pipeline.data import prepare
from pipeline.models import build_model
from pipeline.models.checkpoints import load_checkpoint, load_weights
from pipeline.models.registry import model_normalization

NAME = "precision"
SHARED = SHARED_DATA
WEIGHTS = {"resnet20_a": "resnet20-12fca82f.th", "resnet56_a": "resnet56-4bfd9763.th"}


def views_of_cifar10(workdir: Path, samples: int, views: int) -> torch.Tensor:
    """uint8 [samples * views, 3, 32, 32]: real CIFAR-10 test images under the cifar recipe's views."""
    cfg = DataConfig(source="folder", name="c10", root=str(SHARED / "cifar10-images"), format="raw",
                     max_per_class=max(1, -(-samples // 10)), shard_size=samples)
    manifest = prepare(cfg, shards_dir=workdir, manifest_path=workdir / "m.json", progress=False)
    _, images, _, indices = ShardSource(manifest, workdir, split="test").load(0)
    out = [augment.apply_views("cifar", images, augment.sample_params("cifar", seed=0, view=v, indices=indices))
           for v in range(views)]
    return torch.cat(out)


def load_teacher(arch: str) -> torch.nn.Module:
    model = build_model(arch, num_classes=10)
    load_weights(model, load_checkpoint(SHARED / "cifar10-resnets" / WEIGHTS[arch]), source=WEIGHTS[arch])
    return model.eval()


def compare(reference: np.ndarray, low: np.ndarray) -> dict[str, float]:
    kl1, kl4 = kl_at(reference, low, 1.0), kl_at(reference, low, 4.0)
    return {"kl_tau1_mean": float(kl1.mean()), "kl_tau1_p99": float(np.quantile(kl1, 0.99)),
            "kl_tau1_max": float(kl1.max()), "kl_tau4_max": float(kl4.max()),
            "max_abs_logit_error": float(np.abs(reference - low).max()),
            "top1_agreement": float((reference.argmax(1) == low.argmax(1)).mean())}


def run(*, device: str = "cpu", archs: Sequence[str] = ("resnet20_a", "resnet56_a"), samples: int = 256,
        views: int = 2, batch: int = 256, precisions: Sequence[str] = ("bf16",), rounds: int = 3,
        threads: int | None = None, workdir: Path | None = None) -> dict[str, Any]:
    dev, _ = prepare_run(device, threads, "no")
    tmp = Path(tempfile.mkdtemp(prefix="bench-precision-", dir=workdir))
    try:
        images = views_of_cifar10(tmp, samples, views)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = []
    for arch in archs:
        teacher = load_teacher(arch).to(dev, memory_format=memory_format(dev))
        norm = model_normalization(arch, "cifar")

        def forward(p: str, t: torch.nn.Module = teacher, n: augment.Normalization = norm) -> np.ndarray:
            return teacher_logits(t, images, n, batch_size=batch, device=dev, mixed_precision=p)

        reference = forward("no")
        cases = {p: (lambda p=p: forward(p).shape[0]) for p in ("no", *precisions)}
        rates = interleaved(cases, rounds=rounds, device=dev)
        for p in precisions:
            results.append({"arch": arch, "precision": p, **compare(reference, forward(p)),
                            "stated_kl_tolerance": PRECISION_KL_TOLERANCE[p],
                            "images_per_s": summary(rates[p]), "fp32_images_per_s": summary(rates["no"]),
                            "speed_over_fp32": paired_ratio(rates[p], rates["no"])})
    return {"benchmark": NAME, "machine": machine_info(dev),
            "config": {"archs": list(archs), "images": int(images.shape[0]), "views": views, "batch": batch,
                       "rounds": rounds, "data": "real CIFAR-10 test JPEGs, cifar-recipe views",
                       "weights": "published CIFAR-10 ResNets (cifar10-resnets)"},
            "results": results}


def table(p: dict[str, Any]) -> str:
    rows = [[r["arch"], r["precision"], r["kl_tau1_mean"], r["kl_tau1_max"], r["kl_tau4_max"],
             r["max_abs_logit_error"], r["top1_agreement"], r["stated_kl_tolerance"],
             r["speed_over_fp32"]["median"]] for r in p["results"]]
    return (f"teacher precision vs fp32 on {p['machine']['device_name']}: {p['config']['images']} real CIFAR-10 "
            "views\n" + format_table(["teacher", "precision", "KL1 mean", "KL1 max", "KL4 max", "max|dz|",
                                      "top1 agree", "stated tol", "speed/fp32"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--archs", type=csv_strs, default=["resnet20_a", "resnet56_a"])
    parser.add_argument("--samples", type=int, default=256, help="CIFAR-10 test images (x views)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precisions", type=csv_strs, default=None,
                        help="autocast dtypes to compare with fp32 (default bf16; bf16,fp16 on cuda)")
    args = parser.parse_args(argv)
    precisions = args.precisions or (["bf16", "fp16"] if args.device.startswith("cuda") else ["bf16"])
    payload = run(device=args.device, archs=args.archs, samples=args.samples, views=args.views, batch=args.batch,
                  precisions=precisions, rounds=args.rounds, threads=args.threads)
    return finish_cli(args, payload, table(payload), name=NAME)


if __name__ == "__main__":
    raise SystemExit(main())
