"""Training objective: CE on the classifier logits plus a distillation loss on the distillation logits.

The math lives in :mod:`pipeline.loss_terms` (pure functions, re-exported here); this module
picks a loss by ``LossConfig.name`` from the plain ``LOSSES`` registry and returns its terms as a
named dict the trainer sums and logs (``LossOutput``). The warm-up factor λ(e) is computed by the
trainer (``warmup_factor``) and passed in, never hidden inside a loss.

    total = ce_weight·CE(z_cls, y) + λ(e)·Σ distillation terms(z_kd, sg(z^T), y)
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.config import LossConfig
from pipeline.loss_terms import (
    aekt_loss,
    ce_loss,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    kd_loss,
    nckd,
    nkd_loss,
    nkd_terms,
    tckd,
)

__all__ = [
    "LOSSES", "STAT_PREFIX", "LossOutput", "aekt_loss", "ce_loss", "compute_loss", "describe_loss",
    "dist_loss", "dkd_loss", "kd_loss", "nckd", "nkd_loss", "tckd", "warmup_factor",
]

STAT_PREFIX = "stat/"  # keys of detached diagnostics, logged but never summed into the loss

# A distillation loss: (cfg, z_kd [N, C], teacher logits [N, C] detached, targets [N]) -> named
# scalar terms, already multiplied by their loss weights (not by the warm-up), plus "stat/" keys.
DistillTerms = Callable[[LossConfig, Tensor, Tensor, Tensor], dict[str, Tensor]]


def _ce_only(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return {}


def _kd(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return {"kd": cfg.kd_weight * kd_loss(student, teacher, tau=cfg.tau)}


def _dkd(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return dkd_terms(student, teacher, targets, alpha=cfg.alpha, beta=cfg.beta, tau=cfg.tau)


def _nkd(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return nkd_terms(student, teacher, targets, gamma=cfg.gamma, tau=cfg.tau)


def _dist(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return dist_terms(student, teacher, beta=cfg.beta, gamma=cfg.gamma, tau=cfg.tau)


def _aekt(cfg: LossConfig, student: Tensor, teacher: Tensor, targets: Tensor) -> dict[str, Tensor]:
    return aekt_loss(student, teacher, targets, tau=cfg.tau, alpha=cfg.alpha, beta=cfg.beta,
                     w_min=cfg.w_min, w_max=cfg.w_max, adaptive=cfg.adaptive, explicit=cfg.explicit)


LOSSES: dict[str, DistillTerms] = {
    "ce": _ce_only, "kd": _kd, "dkd": _dkd, "nkd": _nkd, "dist": _dist, "aekt": _aekt,
}


def _aekt_formula(cfg: LossConfig) -> str:
    w = "w·" if cfg.adaptive == "ratio" else ""
    explicit = "tckd" if cfg.explicit == "binary_kl" else "nkd_target"
    return f"{cfg.alpha:g}·{w}{explicit} + {cfg.beta:g}·nckd"


# The distillation part of each loss as "weight·term + …", with the term names of LOSSES' output.
_FORMULAS: dict[str, Callable[[LossConfig], str]] = {
    "ce": lambda cfg: "",
    "kd": lambda cfg: f"{cfg.kd_weight:g}·kd",
    "dkd": lambda cfg: f"{cfg.alpha:g}·tckd + {cfg.beta:g}·nckd",
    "nkd": lambda cfg: f"nkd_target + {cfg.gamma:g}·nkd_nontarget",
    "dist": lambda cfg: f"{cfg.beta:g}·dist_inter + {cfg.gamma:g}·dist_intra",
    "aekt": _aekt_formula,
}


def _lookup(name: str) -> DistillTerms:
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r}: unknown loss. Valid names: {', '.join(LOSSES)}.")
    return LOSSES[name]


@dataclass
class LossOutput:
    """Named loss terms for one batch.

    ``terms`` are scalar tensors, each already multiplied by its weight (and by the warm-up factor
    for distillation terms): the trainer sums them (``total``) and logs each. ``stats`` are
    detached floats under "stat/" keys (w statistics, warm-up) for logging only.
    """

    terms: dict[str, Tensor]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """Sum of the terms: the scalar to backpropagate."""
        return functools.reduce(operator.add, self.terms.values())


def compute_loss(cfg: LossConfig, *, z_cls: Tensor, z_kd: Tensor, teacher_logits: Tensor | None,
                 targets: Tensor, warmup: float) -> LossOutput:
    """ce_weight·CE(z_cls, y) + warmup·(distillation terms of ``cfg.name`` on z_kd).

    Args:
        z_cls: classifier logits ``[N, C]`` (what the exported student predicts with).
        z_kd: distillation logits ``[N, C]`` (from the task-serialization head, or z_cls).
        teacher_logits: ``[N, C]``, detached here; may be None only for ``cfg.name == "ce"``.
        targets: class indices ``[N]``.
        warmup: λ(e) from ``warmup_factor``; scales only the distillation terms.
    """
    distill = _lookup(cfg.name)
    terms = {"ce": cfg.ce_weight * ce_loss(z_cls, targets)}
    stat_tensors: dict[str, Tensor] = {}
    if cfg.name != "ce":
        if teacher_logits is None:
            raise ValueError(f"loss.name={cfg.name!r} needs teacher logits, got None "
                             "(only loss.name='ce' trains without a teacher).")
        for key, value in distill(cfg, z_kd, teacher_logits.detach(), targets).items():
            if key.startswith(STAT_PREFIX):
                stat_tensors[key] = value.detach()
            else:
                terms[key] = warmup * value
    stats: dict[str, float] = {f"{STAT_PREFIX}warmup": float(warmup)}
    if stat_tensors:  # one device sync for all statistics, not one per value
        values = torch.stack([v.float() for v in stat_tensors.values()]).tolist()
        stats.update(zip(stat_tensors, values, strict=True))
    return LossOutput(terms=terms, stats=stats)


def describe_loss(cfg: LossConfig, warmup: float) -> str:
    """What is optimised, for the log: e.g. "1·ce + 1.0·(1·w·tckd + 8·nckd) [τ=4, head=serial]"."""
    _lookup(cfg.name)
    text = f"{cfg.ce_weight:g}·ce"
    if cfg.name == "ce":
        return text
    text += f" + {round(float(warmup), 4)}·({_FORMULAS[cfg.name](cfg)}) [τ={cfg.tau:g}"
    if cfg.name == "aekt" and cfg.adaptive == "ratio":
        text += f", w=clip(sg(p_t^T/p_t^S), {cfg.w_min:g}, {cfg.w_max:g})"
    return text + f", head={cfg.head}]"


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """λ(e) = min(1, e / warmup_epochs), epochs counted from 1; warmup_epochs 0 disables (1.0)."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs={warmup_epochs}: must be >= 0 (0 disables the warm-up).")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, max(0.0, epoch / warmup_epochs))
