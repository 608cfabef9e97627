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
from pipeline.cache.writer import ShardSource, augment_views, teacher_logits
from pipeline.config import AugmentConfig, CacheConfig
from pipeline.data import Manifest

log = logging.getLogger(__name__)

# Max KL(fresh || decoded) at tau=1 accepted per codec: fp16 is near-lossless, int8 loses up to
# range/510 per logit, topk flattens the tail (its error depends on k and the class count).
KL_TOLERANCE = {"fp32": 1e-9, "fp16": 1e-4, "int8": 2e-3, "topk": 5e-2}


def kl_at(reference: np.ndarray, approx: np.ndarray, tau: float) -> np.ndarray:
    """Per-row KL(softmax(ref/tau) || softmax(approx/tau)), float64 ``[n]``."""
    p = F.log_softmax(torch.from_numpy(reference).double() / tau, dim=1)
    q = F.log_softmax(torch.from_numpy(approx).double() / tau, dim=1)
    return (p.exp() * (p - q)).sum(dim=1).numpy()


def verify_cache(*, store_path: Path, manifest_path: Path, shards_dir: Path, teacher_path: Path,
                 cfg: CacheConfig, aug: AugmentConfig, samples: int = 64, seed: int = 0,
                 tolerance: float | None = None) -> dict[str, Any]:
    store = LogitStore.open(store_path)
    manifest = Manifest.load(manifest_path)
    teacher, card = load_model(teacher_path)
    diff = store.provenance.mismatches(expected_provenance(manifest, card, cfg, aug))
    if diff:
        raise CacheError(f"{store_path}: built from other inputs — " + "; ".join(diff) +
                         ". Rebuild it with `aekt cache --rebuild`.")
    prov = store.provenance
    done = store.done_mask()
    if not done.any():
        raise CacheError(f"{store_path}: no finished (view, shard) rows to verify; run `aekt cache`.")
    rng = np.random.default_rng(seed)
    choices = np.argwhere(done)
    picked = choices[rng.choice(len(choices), size=min(len(choices), max(1, samples // 8)), replace=False)]
    source = ShardSource(manifest, Path(shards_dir))
    teacher.eval()
    fresh_all, stored_all, params_ok = [], [], True
    per_row = max(1, samples // len(picked))
    for view, shard in picked:
        keys, images, labels, indices = source.load(int(shard))
        rows = rng.choice(len(keys), size=min(per_row, len(keys)), replace=False)
        stored, params = store.read_row(int(view), int(shard), labels)
        expected = augment.sample_params(prov.recipe, seed=prov.augment_seed, view=int(view),
                                         indices=indices)
        params_ok &= bool(np.array_equal(params, expected))
        views = augment_views(prov.recipe, [images[i] for i in rows], params[rows], prov.image_size)
        fresh = teacher_logits(teacher, views, prov.recipe, batch_size=cfg.batch_size,
                               device=torch.device("cpu"), mixed_precision="no")
        fresh_all.append(fresh)
        stored_all.append(stored[rows])
    fresh, stored = np.concatenate(fresh_all), np.concatenate(stored_all)
    kl1, kl4 = kl_at(fresh, stored, 1.0), kl_at(fresh, stored, 4.0)
    prob_err = np.abs(torch.softmax(torch.from_numpy(fresh), 1).numpy()
                      - torch.softmax(torch.from_numpy(stored), 1).numpy()).max()
    disk = store.disk_bytes()
    payload = sum(v for k, v in disk.items() if k not in ("params", "done"))
    limit = KL_TOLERANCE[prov.codec] if tolerance is None else tolerance
    report = {
        "store": str(store_path), "codec": prov.codec, "codec_params": prov.codec_params,
        "checked": int(len(fresh)), "rows_done": int(done.sum()), "rows_total": int(done.size),
        "max_abs_logit_error": float(np.abs(fresh - stored).max()),
        "max_abs_prob_error_tau1": float(prob_err),
        "kl_tau1_mean": float(kl1.mean()), "kl_tau1_max": float(kl1.max()),
        "kl_tau4_mean": float(kl4.mean()), "kl_tau4_max": float(kl4.max()),
        "params_replayable": params_ok, "kl_tolerance": limit,
        "raw_bytes_per_sample_view": prov.make_codec().raw_bytes_per_row(prov.num_classes),
        "disk_bytes_per_sample_view": payload / (prov.views * prov.num_samples),
        "disk_bytes": disk,
    }
    report["ok"] = bool(params_ok and report["kl_tau1_max"] <= limit)
    return report
