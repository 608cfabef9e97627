"""Task-serialization head: separate classification logits (z_cls) from distillation logits (z_kd).

AEKT (our reconstruction of arXiv 2409.01679, see docs/aekt.md) trains CE on z_cls and the
distillation loss on z_kd. With ``head="serial"`` a C×C layer FC_TS maps z_cls to z_kd, so the
distillation gradient reaches the classifier and backbone through it, and its learned weight
shows how each class's distillation output borrows from the other classes' logits. The head
exists only for training: the exported student is ``model.backbone`` and predicts with z_cls.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

HEADS = ("serial", "parallel", "none")


class DistillStudent(nn.Module):
    """A backbone (its forward returns z_cls) plus a training-only distillation head.

    Args:
        backbone: the student network; its last layer is ``classifier``.
        classifier: the backbone's final ``nn.Linear`` (a submodule of ``backbone``).
        num_classes: C, the classifier's output size.
        head: "serial": z_kd = FC_TS(z_cls), a C×C Linear initialised to the identity, zero bias;
            "parallel": z_kd = W_kd f + b_kd on the classifier's input features f (captured with
            a forward pre-hook), initialised as a copy of the classifier;
            "none": z_kd = z_cls.

    The head is the submodule ``head`` (state-dict keys "head.*"); everything else is under
    "backbone.*", so dropping "head.*" leaves the deployable student.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Linear, num_classes: int, head: str):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"loss.head={head!r}: expected one of {', '.join(HEADS)}.")
        if not isinstance(classifier, nn.Linear) or classifier.out_features != num_classes:
            raise ValueError(f"classifier: expected an nn.Linear with {num_classes} outputs, got "
                             f"{classifier!r}.")
        if not any(m is classifier for m in backbone.modules()):
            raise ValueError("classifier: must be a submodule of backbone (its final layer), so "
                             "that backbone(x) returns z_cls.")
        self.backbone = backbone
        self.head_kind = head
        self.head: nn.Linear | None = None
        self._features: Tensor | None = None
        param = next(classifier.parameters())
        factory: dict[str, Any] = {"device": param.device, "dtype": param.dtype}
        if head == "serial":
            self.head = nn.Linear(num_classes, num_classes, **factory)
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(num_classes, **factory))
                self.head.bias.zero_()
        elif head == "parallel":
            self.head = nn.Linear(classifier.in_features, num_classes, **factory)
            with torch.no_grad():
                self.head.weight.copy_(classifier.weight)
                if classifier.bias is not None:
                    self.head.bias.copy_(classifier.bias)
                else:
                    self.head.bias.zero_()
            classifier.register_forward_pre_hook(self._capture_features)

    def _capture_features(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._features = args[0]  # [B, D], the classifier's input f

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (z_cls, z_kd), both ``[B, C]``."""
        z_cls = self.backbone(x)  # [B, C]
        if self.head_kind == "serial":
            assert self.head is not None
            # FC_TS in fp32 with autocast off: its learned deviations from the identity are ~1e-3
            # of logits ~10, below bf16's 2^-8 resolution, so under bf16 z_kd would equal z_cls.
            with torch.autocast(device_type=z_cls.device.type, enabled=False):
                return z_cls, self.head(z_cls.to(self.head.weight.dtype))
        if self.head_kind == "parallel":
            assert self.head is not None and self._features is not None, "classifier hook did not run"
            features, self._features = self._features, None  # don't keep the graph alive
            return z_cls, self.head(features)
        return z_cls, z_cls

    def head_parameters(self) -> list[nn.Parameter]:
        """FC_TS or parallel-head parameters (FC_TS trains at loss.head_lr_scale × the base lr)."""
        return [] if self.head is None else list(self.head.parameters())

    def body_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters, classifier included: what the exported student keeps."""
        return list(self.backbone.parameters())

    @property
    def serial_weight(self) -> Tensor | None:
        """The C×C FC_TS weight (row: z_kd class, column: z_cls class) for ``aekt inspect``."""
        if self.head_kind != "serial" or self.head is None:
            return None
        return self.head.weight


def _is_no_decay(param: nn.Parameter) -> bool:
    # Biases and norm scales/shifts are the 1-d parameters of conv/linear/norm networks.
    return param.ndim <= 1


def build_param_groups(model: DistillStudent, *, lr: float, weight_decay: float, head_lr_scale: float,
                       no_decay_norm_bias: bool) -> list[dict]:
    """Optimizer param groups: body and head, each split into decay / no-decay when asked.

    The serial head's lr is ``lr * head_lr_scale`` (FC_TS acts on logits of magnitude ~10, so at
    the body's lr it diverges); the parallel head reads the same features as the classifier and
    trains at the body's ``lr`` (scaled down it would stay near its initial copy). Each group
    carries "name" and "base_lr" (its lr at schedule scale 1) so a trainer sets
    ``group["lr"] = group["base_lr"] * schedule(step)``. Parameters with ``requires_grad=False``
    are left out; empty groups are dropped.
    """
    groups: list[dict] = []
    for part, params, part_lr in (("body", model.body_parameters(), lr),
                                  ("head", model.head_parameters(),
                                   lr * head_lr_scale if model.head_kind == "serial" else lr)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if not (no_decay_norm_bias and _is_no_decay(p))]
        no_decay = [p for p in params if no_decay_norm_bias and _is_no_decay(p)]
        for name, members, wd in ((part, decay, weight_decay), (f"{part}_no_decay", no_decay, 0.0)):
            if members:
                groups.append({"name": name, "params": members, "lr": part_lr, "base_lr": part_lr,
                               "weight_decay": wd})
    log.debug("param groups: %s", [(g["name"], len(g["params"]), g["lr"]) for g in groups])
    return groups
