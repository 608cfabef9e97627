"""Distillation loss math: pure functions of logits (see /work/shared/AEKT.md and docs/aekt.md).

Every function takes student and teacher logits ``[N, C]`` (any float dtype) and integer targets
``[N]``, computes in float32 (float64 if an input is float64) from ``log_softmax``, and returns a
batch-mean scalar (or ``[N]`` with ``reduction="none"``). Probabilities are never divided: the
non-target distribution p̂ is a softmax with the target logit masked to -inf, and log(1 - p_t) is
a log-sum-exp over the non-target log-probabilities. The caller detaches the teacher.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "none")
ADAPTIVE = ("ratio", "none")
EXPLICIT = ("binary_kl", "nkd")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast, never computed in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(student: Tensor, teacher: Tensor | None = None, targets: Tensor | None = None) -> None:
    if student.ndim != 2 or student.shape[1] < 2:
        raise ValueError(f"logits: expected shape [N, C] with C >= 2, got {tuple(student.shape)}.")
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} do not match student logits "
                         f"{tuple(student.shape)}.")
    if targets is not None and targets.shape != student.shape[:1]:
        raise ValueError(f"targets: expected shape [{student.shape[0]}], got {tuple(targets.shape)}.")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(REDUCTIONS)}.")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities: ``[N, K] -> [N]``; log_p must be finite."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def log_probs(logits: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    """log softmax(z / tau) in ``dtype``: ``[N, C] -> [N, C]``."""
    return F.log_softmax(logits.to(dtype) / tau, dim=1)


def target_mask(targets: Tensor, num_classes: int) -> Tensor:
    """One-hot boolean mask of the target class: ``[N] -> [N, C]``."""
    return F.one_hot(targets.long(), num_classes).bool()


def decompose(logits: Tensor, mask: Tensor, tau: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(log b, log p̂) of softmax(z / τ) from two log-sum-exps: ``[N, C] -> ([N, 2], [N, C])``.

    With L = LSE_k z_k/τ and R = LSE_{k≠y} z_k/τ (the target masked to -inf):
    log b = [z_y/τ - L, R - L] = [log p_t, log(1 - p_t)], and log p̂_j = z_j/τ - R, the
    log-softmax over the non-target classes. p̂'s target entry is set to 0 so that KL and
    cross-entropy sums over rows stay finite (it contributes 0 there: both sides hold 0), and since
    neither z_j/τ (j ≠ y) nor R depends on z_y, p̂ carries exactly no gradient to the target logit.
    """
    z = logits.to(dtype) / tau  # [N, C]
    lse_all = torch.logsumexp(z, dim=1)  # [N]
    lse_rest = torch.logsumexp(z.masked_fill(mask, -math.inf), dim=1)  # [N]
    log_pt = z.masked_fill(~mask, 0.0).sum(dim=1) - lse_all  # [N]
    log_q = (z - lse_rest.unsqueeze(1)).masked_fill(mask, 0.0)  # [N, C]
    return torch.stack([log_pt, lse_rest - lse_all], dim=1), log_q


def decoupled_rows(student: Tensor, teacher: Tensor, targets: Tensor, *, tau: float) -> dict[str, Tensor]:
    """Per-sample pieces of DKD/AEKT from one log-softmax per side (all ``[N]``).

    {"tckd": τ²·KL(b^T ‖ b^S), "nckd": τ²·KL(p̂^T ‖ p̂^S), "log_pt_s", "log_pt_t"} — the last two
    are log p_t at τ (student, teacher), for AEKT's weight. Every loss built from these rows shares
    the same arithmetic, so AEKT with w = 1 equals DKD bit for bit.
    """
    _check(student, teacher, targets)
    dtype = compute_dtype(student, teacher)
    mask = target_mask(targets, student.shape[1])  # [N, C]
    log_bs, log_qs = decompose(student, mask, tau, dtype)
    log_bt, log_qt = decompose(teacher, mask, tau, dtype)
    return {"tckd": tau**2 * _kl_rows(log_bt, log_bs), "nckd": tau**2 * _kl_rows(log_qt, log_qs),
            "log_pt_s": log_bs[:, 0], "log_pt_t": log_bt[:, 0]}


def ce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy(z, y), batch mean. logits ``[N, C]``, targets ``[N]`` -> scalar."""
    _check(logits, targets=targets)
    return F.cross_entropy(logits.to(compute_dtype(logits)), targets.long())


def kd_loss(student: Tensor, teacher: Tensor, *, tau: float) -> Tensor:
    """Hinton KD: τ²·KL(p^T ‖ p^S) with p = softmax(z/τ), batch mean. ``[N, C]`` x2 -> scalar."""
    _check(student, teacher)
    dtype = compute_dtype(student, teacher)
    per_sample = _kl_rows(log_probs(teacher, tau, dtype), log_probs(student, tau, dtype))  # [N]
    return tau**2 * per_sample.mean()


def tckd(student: Tensor, teacher: Tensor, targets: Tensor, *, tau: float,
         reduction: str = "mean") -> Tensor:
    """Target-class KD: τ²·KL(b^T ‖ b^S) with b = [p_t, 1 - p_t]. Scalar, or ``[N]`` for "none"."""
    return _reduce(decoupled_rows(student, teacher, targets, tau=tau)["tckd"], reduction)


def nckd(student: Tensor, teacher: Tensor, targets: Tensor, *, tau: float,
         reduction: str = "mean") -> Tensor:
    """Non-target-class KD: τ²·KL(p̂^T ‖ p̂^S) over the classes j ≠ y. Scalar, or ``[N]``."""
    return _reduce(decoupled_rows(student, teacher, targets, tau=tau)["nckd"], reduction)


def dkd_terms(student: Tensor, teacher: Tensor, targets: Tensor, *, alpha: float, beta: float,
              tau: float) -> dict[str, Tensor]:
    """DKD's weighted terms {"tckd": α·TCKD, "nckd": β·NCKD} (scalars)."""
    rows = decoupled_rows(student, teacher, targets, tau=tau)
    return {"tckd": alpha * rows["tckd"].mean(), "nckd": beta * rows["nckd"].mean()}


def dkd_loss(student: Tensor, teacher: Tensor, targets: Tensor, *, alpha: float, beta: float,
             tau: float) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD. ``[N, C]`` x2, ``[N]`` -> scalar."""
    terms = dkd_terms(student, teacher, targets, alpha=alpha, beta=beta, tau=tau)
    return terms["tckd"] + terms["nckd"]


def nkd_target(student: Tensor, teacher: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """NKD's explicit term −p_t^T·log p_t^S at τ = 1 (a cross-entropy, not 0 at S = T)."""
    _check(student, teacher, targets)
    dtype = compute_dtype(student, teacher)
    index = targets.long().unsqueeze(1)  # [N, 1]
    log_pt_s = log_probs(student, 1.0, dtype).gather(1, index).squeeze(1)  # [N]
    pt_t = log_probs(teacher, 1.0, dtype).gather(1, index).squeeze(1).exp()  # [N]
    return _reduce(-pt_t * log_pt_s, reduction)


def nkd_terms(student: Tensor, teacher: Tensor, targets: Tensor, *, gamma: float,
              tau: float) -> dict[str, Tensor]:
    """NKD's terms {"nkd_target": −p_t^T log p_t^S (τ=1), "nkd_nontarget": γτ²·CE(p̂^T, p̂^S)}."""
    _check(student, teacher, targets)
    dtype = compute_dtype(student, teacher)
    mask = target_mask(targets, student.shape[1])  # [N, C]
    _, log_qs = decompose(student, mask, tau, dtype)  # [N, C]
    q_t = decompose(teacher, mask, tau, dtype)[1].exp().masked_fill(mask, 0.0)  # [N, C]
    nontarget = -(q_t * log_qs).sum(dim=1).mean()
    return {"nkd_target": nkd_target(student, teacher, targets),
            "nkd_nontarget": gamma * tau**2 * nontarget}


def nkd_loss(student: Tensor, teacher: Tensor, targets: Tensor, *, gamma: float, tau: float) -> Tensor:
    """Normalized KD (Yang et al. 2023): −p_t^T log p_t^S (τ=1) + γτ²·(−Σ_{j≠y} p̂_j^T log p̂_j^S)."""
    terms = nkd_terms(student, teacher, targets, gamma=gamma, tau=tau)
    return terms["nkd_target"] + terms["nkd_nontarget"]


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson correlation along ``dim`` (cosine of the centred vectors, eps-guarded)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return F.cosine_similarity(a, b, dim=dim, eps=1e-8)


def dist_terms(student: Tensor, teacher: Tensor, *, beta: float, gamma: float,
               tau: float) -> dict[str, Tensor]:
    """DIST's terms {"dist_inter": β·τ²·(1 − mean_i ρ(p_i·)), "dist_intra": γ·τ²·(1 − mean_c ρ(p_·c))}."""
    _check(student, teacher)
    dtype = compute_dtype(student, teacher)
    p_s = log_probs(student, tau, dtype).exp()  # [N, C]
    p_t = log_probs(teacher, tau, dtype).exp()  # [N, C]
    inter = 1.0 - _pearson(p_s, p_t, dim=1).mean()  # per sample, across classes
    intra = 1.0 - _pearson(p_s, p_t, dim=0).mean()  # per class, across the batch
    return {"dist_inter": beta * tau**2 * inter, "dist_intra": gamma * tau**2 * intra}


def dist_loss(student: Tensor, teacher: Tensor, *, beta: float, gamma: float, tau: float) -> Tensor:
    """DIST (Huang et al. 2022): Pearson-correlation matching, inter- (β) and intra-class (γ)."""
    terms = dist_terms(student, teacher, beta=beta, gamma=gamma, tau=tau)
    return terms["dist_inter"] + terms["dist_intra"]


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}.")


def aekt_loss(student: Tensor, teacher: Tensor, targets: Tensor, *, tau: float, alpha: float,
              beta: float, w_min: float, w_max: float, adaptive: str = "ratio",
              explicit: str = "binary_kl") -> dict[str, Tensor]:
    """AEKT (reconstruction of Park & Lee, arXiv 2409.01679): α·mean(w·E) + β·NCKD.

    E per sample is TCKD (``explicit="binary_kl"``) or NKD's −p_t^T log p_t^S at τ = 1
    (``explicit="nkd"``); w = clip(sg(p_t^T / p_t^S), w_min, w_max) with p at temperature τ
    (``adaptive="ratio"``) or w = 1 (``adaptive="none"``, then the sum equals DKD exactly).

    Args: student, teacher ``[N, C]``; targets ``[N]``.
    Returns: {"explicit": scalar, "implicit": scalar} plus detached scalars "stat/w_mean",
    "stat/w_min", "stat/w_max", "stat/w_clipped" (share of samples at a clip bound),
    "stat/pt_teacher" and "stat/pt_student" (mean p_t at τ).
    """
    _choice("adaptive", adaptive, ADAPTIVE)
    _choice("explicit", explicit, EXPLICIT)
    rows = decoupled_rows(student, teacher, targets, tau=tau)
    explicit_rows = rows["tckd"] if explicit == "binary_kl" else nkd_target(student, teacher, targets,
                                                                              reduction="none")  # [N]
    with torch.no_grad():
        dtype = compute_dtype(student, teacher)
        log_pt_s, log_pt_t = rows["log_pt_s"].detach(), rows["log_pt_t"]  # [N] each
        if adaptive == "ratio":
            ratio = (log_pt_t - log_pt_s).exp()  # [N]; may be inf, the clip bounds it
            w = ratio.clamp(w_min, w_max)
            clipped = ((ratio < w_min) | (ratio > w_max)).to(dtype)
        else:
            w = torch.ones_like(log_pt_s)
            clipped = torch.zeros_like(log_pt_s)
    weighted = explicit_rows if adaptive == "none" else w * explicit_rows  # w=1 skipped: DKD bit-exact
    return {
        "explicit": alpha * weighted.mean(),
        "implicit": beta * rows["nckd"].mean(),
        "stat/w_mean": w.mean(), "stat/w_min": w.min(), "stat/w_max": w.max(),
        "stat/w_clipped": clipped.mean(),
        "stat/pt_teacher": log_pt_t.exp().mean(), "stat/pt_student": log_pt_s.exp().mean(),
    }
