"""What the trainer checks and measures besides the loss: each term's gradient norm at the logits,
and a stop with a clear message (no model written) when the loss or the weights become non-finite."""

from __future__ import annotations

import torch

from pipeline.config import LossConfig
from pipeline.errors import UserError
from pipeline.losses import compute_loss
from pipeline.models.checkpoints import name_list, nonfinite_tensors


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN/inf: training stops instead of writing a broken model."""


def term_grad_norms(terms: dict[str, torch.Tensor], logits: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Norm of each loss term's gradient w.r.t. ``logits`` (AEKT.md: log how strongly each term
    pulls). Taken at the logits, not the weights, so it costs a backward through the loss only; the
    trainer passes detached leaves (``probe_term_grads``), so CE is measured at z_cls and each
    distillation term at z_kd. Returned as 0-d tensors on the device: no host sync here."""
    inputs = list({id(t): t for t in logits if t.requires_grad}.values())
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            continue
        grads = [g for g in torch.autograd.grad(term, inputs, retain_graph=True, allow_unused=True) if g is not None]
        norms[f"grad/{name}"] = (torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt() if grads
                                 else inputs[0].new_zeros(()))
    return norms


def probe_term_grads(cfg: LossConfig, z_cls: torch.Tensor, z_kd: torch.Tensor, teacher: torch.Tensor | None,
                     targets: torch.Tensor, warmup: float) -> dict[str, torch.Tensor]:
    """``term_grad_norms`` of the eager loss at detached copies of the logits.

    The gradient w.r.t. the logits depends only on their values, so the probe never touches the
    training graph: no ``retain_graph`` on it, which a compiled loss's backward (train.compile_loss)
    does not allow, and the step's own backward is unchanged."""
    a = z_cls.detach().requires_grad_()
    b = a if z_kd is z_cls else z_kd.detach().requires_grad_()
    with torch.enable_grad():
        out = compute_loss(cfg, z_cls=a, z_kd=b, teacher_logits=teacher, targets=targets, warmup=warmup)
        return term_grad_norms(out.terms, (a, b))


def _divergence_fix(section: str) -> str:
    if section == "train":
        return ("lower train.lr or loss.head_lr_scale in params.yaml, or check the cached teacher logits "
                "(`aekt verify-cache`). No model was written.")
    return f"lower {section}.lr in params.yaml (or add {section}.lr_warmup_epochs). No model was written."


def check_finite(term_sums: dict[str, torch.Tensor], epoch: int, step: int, section: str = "train") -> None:
    """One host sync for all terms accumulated so far; called every NAN_CHECK_EVERY steps."""
    if term_sums and not bool(torch.isfinite(torch.stack(list(term_sums.values()))).all()):
        bad = [k for k, v in term_sums.items() if not torch.isfinite(v)]
        raise TrainingDiverged(f"loss became non-finite by epoch {epoch} step {step} (terms: {', '.join(bad)}); "
                               + _divergence_fix(section))


def check_finite_weights(model: torch.nn.Module, desc: str, epoch: int, section: str) -> None:
    """Refuse weights holding NaN/inf (the loss can stay finite while, e.g., a BatchNorm statistic
    overflows), so no diverged model is checkpointed or exported."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise TrainingDiverged(f"{desc}: weights became non-finite (NaN/inf) by epoch {epoch} ({name_list(bad)}); "
                               + _divergence_fix(section))
