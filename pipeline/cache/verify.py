"""`aekt verify-cache`: replay stored views through a fresh teacher and compare with the store.

For a random subset of (view, sample) pairs it reads the shard, re-applies the *stored* augmentation
parameters with the same code path stage 1 used, runs the teacher, and reports the max |delta logit|
and the KL divergence (teacher-fresh || decoded) at tau = 1 and 4. It also checks that the stored
parameters equal the ones the (seed, view, index) generator gives, i.e. that views are replayable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import augment
from pipeline.artifacts import load_model
from pipeline.cache.build import expected_provenance
from pipeline.cache.store import CacheError, LogitStore
from pipeline.cache.writer import ShardSource, teacher_logits
from pipeline.config import AugmentConfig, CacheConfig
from pipeline.data import Manifest
from pipeline.data.location import Location, as_location
from pipeline.device_decode import decode_and_augment
from pipeline.progress import Progress

log = logging.getLogger(__name__)

# Max KL(fresh || decoded) at tau=1 accepted per codec: fp16 is near-lossless, int8 loses up to
# range/510 per logit, topk flattens the tail (its error depends on k and the class count).
KL_TOLERANCE = {"fp32": 1e-9, "fp16": 1e-4, "int8": 2e-3, "topk": 5e-2}
# Added to the codec's bound for a store built under autocast (cache.mixed_precision), since this
# check recomputes in fp32. bf16: ~4x the max KL(fp32 || bf16) at tau=1 that `aekt bench precision`
# measured with the published CIFAR-10 ResNet-20/56 on real CIFAR-10 views (0.013 max, 3e-4 mean,
# CPU autocast; docs/benchmarks.md). fp16 is not measured yet (it needs a GPU): it gets bf16's bound.
PRECISION_KL_TOLERANCE = {"no": 0.0, "bf16": 5e-2, "fp16": 5e-2}


def kl_at(reference: np.ndarray, approx: np.ndarray, tau: float) -> np.ndarray:
    """Per-row KL(softmax(ref/tau) || softmax(approx/tau)), float64 ``[n]``."""
    p = F.log_softmax(torch.from_numpy(reference).double() / tau, dim=1)
    q = F.log_softmax(torch.from_numpy(approx).double() / tau, dim=1)
    return (p.exp() * (p - q)).sum(dim=1).numpy()


def verify_cache(*, store_path: Location, manifest_path: Path, shards_dir: Location, teacher_path: Path,
                 cfg: CacheConfig, aug: AugmentConfig, samples: int = 64, seed: int = 0,
                 tolerance: float | None = None) -> dict[str, Any]:
    """Recompute ``samples`` (view, sample) pairs; the report's ``failures`` say which check failed,
    by how much, where it is worst, and what to do (empty when the store verifies)."""
    if samples < 1:
        raise CacheError(f"--samples {samples}: verify-cache needs at least 1 sample; pass e.g. --samples 64.")
    if tolerance is not None and not tolerance >= 0:  # NaN fails `>= 0` too
        raise CacheError(f"--tolerance {tolerance}: the max KL accepted must be a number >= 0; omit it "
                         "for the codec's stated bound.")
    store = LogitStore.open(store_path)
    manifest = Manifest.load(manifest_path)
    teacher, card = load_model(teacher_path)
    # A store decoded on a GPU (augment.decode: device) is replayed there, when this machine has one.
    device = torch.device("cuda" if store.provenance.pixel_source == "device-cuda" and torch.cuda.is_available()
                          else "cpu")
    diff = store.provenance.mismatches(expected_provenance(manifest, card, cfg, aug, device.type))
    if diff:
        raise CacheError(f"{store_path}: built from other inputs — " + "; ".join(diff) +
                         ". Rebuild it with `aekt cache --rebuild`.")
    prov = store.provenance
    done = store.done_mask()  # raises if a finished row's chunk file is missing
    if not done.any():
        raise CacheError(f"{store_path}: no finished (view, shard) rows to verify; run `aekt cache`.")
    rng = np.random.default_rng(seed)
    choices = np.argwhere(done)
    picked = choices[rng.choice(len(choices), size=min(len(choices), max(1, samples // 8)), replace=False)]
    source = ShardSource(manifest, as_location(shards_dir))
    teacher.eval()
    fresh_all, stored_all, where, bad_params = [], [], [], []
    norm = augment.Normalization.from_card(card)  # the teacher's own input normalisation
    per_row = max(1, samples // len(picked))
    for view, shard in Progress(len(picked), "verify-cache rows", "row", logger=log).wrap(picked):
        on_device = prov.pixel_source != "pil"
        keys, images, labels, indices = source.load(int(shard), decode=not on_device)
        rows = rng.choice(len(keys), size=min(per_row, len(keys)), replace=False)
        stored, params = store.read_row(int(view), int(shard), labels)
        expected = augment.sample_params(prov.recipe, seed=prov.augment_seed, view=int(view),
                                         indices=indices)
        bad_params += [(int(view), int(indices[i]), keys[i], params[i].tolist(), expected[i].tolist())
                       for i in np.flatnonzero((params != expected).any(axis=1))]
        if on_device:  # the path stage 1 took (pipeline/device_decode.py)
            views = decode_and_augment([images[i] for i in rows], params[rows], path="device",
                                       channels=manifest.channels, size=prov.image_size, device=device,
                                       names=[keys[i] for i in rows], recipe=prov.recipe).cpu()
        else:
            views = augment.apply_views(prov.recipe, [images[i] for i in rows], params[rows], size=prov.image_size)
        fresh = teacher_logits(teacher, views, norm, batch_size=cfg.batch_size,
                               device=torch.device("cpu"), mixed_precision="no")
        fresh_all.append(fresh)
        stored_all.append(stored[rows])
        where += [{"view": int(view), "index": int(indices[i]), "key": keys[i]} for i in rows]
    fresh, stored = np.concatenate(fresh_all), np.concatenate(stored_all)
    kl1, kl4 = kl_at(fresh, stored, 1.0), kl_at(fresh, stored, 4.0)
    abs_err = np.abs(fresh - stored).max(axis=1)
    prob_err = np.abs(torch.softmax(torch.from_numpy(fresh), 1).numpy()
                      - torch.softmax(torch.from_numpy(stored), 1).numpy()).max()
    disk = store.disk_bytes()
    payload = sum(v for k, v in disk.items() if k not in ("params", "done"))
    limit = (KL_TOLERANCE[prov.codec] + PRECISION_KL_TOLERANCE.get(prov.teacher_precision, 0.0)
             if tolerance is None else tolerance)
    report = {
        "store": str(store_path), "codec": prov.codec, "codec_params": prov.codec_params,
        "checked": int(len(fresh)), "rows_done": int(done.sum()), "rows_total": int(done.size),
        "max_abs_logit_error": float(abs_err.max()),
        "max_abs_prob_error_tau1": float(prob_err),
        "kl_tau1_mean": float(kl1.mean()), "kl_tau1_max": float(kl1.max()),
        "kl_tau4_mean": float(kl4.mean()), "kl_tau4_max": float(kl4.max()),
        "worst_kl_tau1": {**where[int(kl1.argmax())], "kl": float(kl1.max())},
        "worst_abs_logit_error": {**where[int(abs_err.argmax())], "abs_error": float(abs_err.max())},
        "params_replayable": not bad_params, "params_mismatches": len(bad_params), "kl_tolerance": limit,
        "raw_bytes_per_sample_view": prov.make_codec().raw_bytes_per_row(prov.num_classes),
        "disk_bytes_per_sample_view": payload / (prov.views * prov.num_samples),
        "disk_bytes": disk,
    }
    report["failures"] = failures(report, prov.teacher_precision, bad_params[:1])
    report["ok"] = not report["failures"]
    return report


def failures(report: dict[str, Any], teacher_precision: str, bad_params: list[tuple]) -> list[str]:
    """One sentence per failed check: what was measured, the bound, where it is worst."""
    out = []
    if bad_params:
        view, index, key, got, want = bad_params[0]
        out.append(f"the stored augmentation params differ from the (seed, view, index) generator's for "
                   f"{report['params_mismatches']} checked samples (first: view {view}, sample index "
                   f"{index} '{key}': stored {got}, expected {want}), so stage 2 would not replay the "
                   "views the teacher saw")
    if not report["kl_tau1_max"] <= report["kl_tolerance"]:
        worst, far = report["worst_kl_tau1"], report["worst_abs_logit_error"]
        precision = (f"; the store was built with cache.mixed_precision={teacher_precision} and this "
                     "check recomputes in fp32: the bound includes that precision's stated gap "
                     f"({PRECISION_KL_TOLERANCE.get(teacher_precision, 0.0):.3g})"
                     if teacher_precision != "no" else "")
        out.append(f"KL(fresh teacher || cached) at tau=1 reaches {report['kl_tau1_max']:.3g}, above the "
                   f"{report['codec']} tolerance {report['kl_tolerance']:.3g} (worst: view "
                   f"{worst['view']}, sample index {worst['index']} '{worst['key']}'; max |dlogit| "
                   f"{far['abs_error']:.3g} at view {far['view']}, sample index {far['index']}){precision}")
    return out


def failure_message(report: dict[str, Any]) -> str:
    """The one-paragraph error for a store that failed verification."""
    return (f"{report['store']}: verification failed — " + "; ".join(report["failures"]) +
            ". The store does not hold what this teacher computes on these views (damaged, or built "
            "by other code): delete it and rerun `aekt cache` (or `dvc repro cache`).")
