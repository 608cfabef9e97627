"""Training objective: CE on the classifier logits plus a distillation loss on the distillation logits.

The math lives in :mod:`pipeline.loss_terms` (pure functions, re-exported here); this module
picks a loss by ``LossConfig.name`` from the plain ``LOSSES`` registry and returns its terms as a
named dict the trainer sums and logs (``LossOutput``). The warm-up factor λ(e) is computed by the
trainer (``warmup_factor``) and passed in, never hidden inside a loss.

    total = ce_weight·CE(z_cls, y) + λ(e)·Σ distillation terms(z_kd, sg(z^T), y)
"""

from __future__ import annotations

import functools
import logging
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
    "LOSSES", "STAT_PREFIX", "LossOutput", "TermsFn", "aekt_loss", "ce_loss", "compute_loss", "describe_loss",
    "compiled_loss_terms", "dist_loss", "dkd_loss", "kd_loss", "loss_terms", "loss_warmup", "nckd", "nkd_loss", "tckd",
    "warmup_factor",
]

log = logging.getLogger(__name__)

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
    return dist_terms(student, teacher, beta=cfg.dist_beta, gamma=cfg.dist_gamma, tau=cfg.tau)


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
    "dist": lambda cfg: f"{cfg.dist_beta:g}·dist_inter + {cfg.dist_gamma:g}·dist_intra",
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
    diagnostics under "stat/" keys (w statistics, warm-up) for logging only: the warm-up as a float,
    the others as detached 0-d tensors on the loss's device, so that a training step never waits
    for the device to log them (the trainer sums them on the device and reads them once per epoch).
    """

    terms: dict[str, Tensor]
    stats: dict[str, Tensor | float] = field(default_factory=dict)

    def stat_values(self) -> dict[str, float]:
        """``stats`` as floats (one device sync for all of them)."""
        keys = [k for k, v in self.stats.items() if isinstance(v, Tensor)]
        values = dict(zip(keys, torch.stack([self.stats[k].float() for k in keys]).tolist() if keys else [],
                          strict=True))
        return {k: values[k] if k in values else float(v) for k, v in self.stats.items()}

    @property
    def total(self) -> Tensor:
        """Sum of the terms: the scalar to backpropagate."""
        return functools.reduce(operator.add, self.terms.values())


# (z_cls, z_kd, teacher logits or None, targets) -> (terms before the warm-up factor, stats)
TermsFn = Callable[[Tensor, Tensor, Tensor | None, Tensor], tuple[dict[str, Tensor], dict[str, Tensor]]]


def loss_terms(cfg: LossConfig, z_cls: Tensor, z_kd: Tensor, teacher_logits: Tensor | None,
               targets: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({"ce": ce_weight·CE, distillation terms of ``cfg.name``}, {"stat/…": detached}), before the
    warm-up factor: the pure part of :func:`compute_loss`, which :func:`compiled_loss_terms` compiles."""
    distill = _lookup(cfg.name)
    terms = {"ce": cfg.ce_weight * ce_loss(z_cls, targets)}
    stats: dict[str, Tensor] = {}
    if cfg.name != "ce":
        if teacher_logits is None:
            raise ValueError(f"loss.name={cfg.name!r} needs teacher logits, got None "
                             "(only loss.name='ce' trains without a teacher).")
        for key, value in distill(cfg, z_kd, teacher_logits.detach(), targets).items():
            if key.startswith(STAT_PREFIX):
                stats[key] = value.detach()
            else:
                terms[key] = value
    return terms, stats


def compiled_loss_terms(cfg: LossConfig) -> TermsFn:
    """:func:`loss_terms` for ``cfg`` through ``torch.compile`` (``train.compile_loss``).

    A distillation loss is ~100 tiny element-wise ops on ``[N, C]`` logits: on a GPU at CIFAR
    batch sizes each is a kernel launch plus Python dispatch, which costs more than the student's
    convolutions (docs/benchmarks.md, "Loss overhead on the GPU"); compiled, forward and backward
    are a few fused kernels. The warm-up factor stays outside (it changes every epoch and would
    recompile). If compilation fails (no C++ compiler or Triton, an unsupported platform) the loss
    runs eagerly, with one warning: same numbers, only slower.
    """
    eager = functools.partial(loss_terms, cfg)
    compiled = torch.compile(eager)
    failed: list[str] = []

    def terms(z_cls: Tensor, z_kd: Tensor, teacher_logits: Tensor | None,
              targets: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not failed:
            try:
                return compiled(z_cls, z_kd, teacher_logits, targets)
            except ValueError:  # the loss's own input checks: the same error as eager mode
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                failed.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                log.warning("train.compile_loss: compiling the %s loss failed (%s); running it eagerly "
                            "(same results, slower). Set train.compile_loss: false to skip the attempt.",
                            cfg.name, failed[0][:300])
        return eager(z_cls, z_kd, teacher_logits, targets)

    return terms


def compute_loss(cfg: LossConfig, *, z_cls: Tensor, z_kd: Tensor, teacher_logits: Tensor | None,
                 targets: Tensor, warmup: float, terms_fn: TermsFn | None = None) -> LossOutput:
    """ce_weight·CE(z_cls, y) + warmup·(distillation terms of ``cfg.name`` on z_kd).

    Args:
        z_cls: classifier logits ``[N, C]`` (what the exported student predicts with).
        z_kd: distillation logits ``[N, C]`` (from the task-serialization head, or z_cls).
        teacher_logits: ``[N, C]``, detached here; may be None only for ``cfg.name == "ce"``.
        targets: class indices ``[N]``.
        warmup: λ(e) from ``warmup_factor``; scales only the distillation terms.
        terms_fn: :func:`loss_terms` for ``cfg`` (default) or :func:`compiled_loss_terms`.
    """
    if terms_fn is None:
        terms_fn = functools.partial(loss_terms, cfg)
    raw, stat_tensors = terms_fn(z_cls, z_kd, teacher_logits, targets)
    terms = {key: value if key == "ce" else warmup * value for key, value in raw.items()}
    stats: dict[str, Tensor | float] = {f"{STAT_PREFIX}warmup": float(warmup), **stat_tensors}
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
    return text + f", head={cfg.effective_head}]"


def loss_warmup(cfg: LossConfig, epoch: int) -> float:
    """λ(e) for ``cfg`` at 1-based ``epoch``: the warm-up ramp for the losses in
    ``cfg.warmup_losses`` (DKD and AEKT by default), 1.0 for the others (and for CE)."""
    return warmup_factor(epoch, cfg.warmup_epochs) if cfg.uses_warmup() else 1.0


def warmup_factor(epoch: float, warmup_epochs: float) -> float:
    """λ(e) = min(1, e / warmup_epochs), epochs counted from 1; warmup_epochs 0 disables (1.0)."""
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs={warmup_epochs}: must be >= 0 (0 disables the warm-up).")
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, max(0.0, epoch / warmup_epochs))
