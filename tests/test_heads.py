"""pipeline.heads: the task-serialization head, its init, gradient path and optimizer groups."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.heads import HEADS, DistillStudent, build_param_groups
from pipeline.losses import kd_loss

C, D = 5, 12


def tiny_backbone(seed: int = 0, hidden: bool = False) -> tuple[nn.Sequential, nn.Linear]:
    """nn.Sequential(Flatten, [Linear, ReLU,] Linear) in float64 and its final Linear."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()] + ([nn.Linear(D, 8), nn.ReLU()] if hidden else [])
    classifier = nn.Linear(8 if hidden else D, C)
    return nn.Sequential(*layers, classifier).double(), classifier.double()


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("seed", range(3))
def test_z_kd_equals_z_cls_at_init(head, seed):
    backbone, classifier = tiny_backbone(seed, hidden=seed % 2 == 1)
    model = DistillStudent(backbone, classifier, C, head)
    z_cls, z_kd = model(inputs(seed))
    assert z_cls.shape == z_kd.shape == (4, C)
    torch.testing.assert_close(z_kd, z_cls, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_cls, backbone(inputs(seed)))


def test_serial_head_starts_as_identity():
    model = DistillStudent(*tiny_backbone(), C, "serial")
    assert model.serial_weight is not None
    torch.testing.assert_close(model.serial_weight, torch.eye(C, dtype=torch.float64))
    assert torch.all(model.head.bias == 0)


@pytest.mark.parametrize("head", ["parallel", "none"])
def test_serial_weight_only_for_serial(head):
    assert DistillStudent(*tiny_backbone(), C, head).serial_weight is None


def test_distillation_gradient_flows_through_fc_ts_into_classifier():
    backbone, classifier = tiny_backbone()
    model = DistillStudent(backbone, classifier, C, "serial")
    teacher = torch.randn(4, C, dtype=torch.float64)
    _, z_kd = model(inputs())
    kd_loss(z_kd, teacher, tau=4.0).backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0
    # FC_TS is the identity at init, so the classifier gets the gradient of the loss on z_cls.
    reference, reference_cls = tiny_backbone()
    kd_loss(reference(inputs()), teacher, tau=4.0).backward()
    torch.testing.assert_close(classifier.weight.grad, reference_cls.weight.grad)


def test_parallel_head_reads_features_and_bypasses_classifier():
    backbone, classifier = tiny_backbone(hidden=True)
    model = DistillStudent(backbone, classifier, C, "parallel")
    _, z_kd = model(inputs())
    kd_loss(z_kd, torch.randn(4, C, dtype=torch.float64), tau=4.0).backward()
    assert classifier.weight.grad is None
    assert backbone[1].weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model._features is None  # released after the forward
    clone = copy.deepcopy(model)  # the pre-hook must follow the copy, not the original
    with torch.no_grad():
        clone.head.weight.add_(1.0)
    z_cls, z_kd = clone(inputs())
    assert not torch.allclose(z_kd, z_cls)


@pytest.mark.parametrize("head", HEADS)
def test_head_is_separable_from_the_exported_student(head):
    backbone, classifier = tiny_backbone(hidden=True)
    model = DistillStudent(backbone, classifier, C, head)
    body, extra = model.body_parameters(), model.head_parameters()
    assert {id(p) for p in body}.isdisjoint(id(p) for p in extra)
    assert {id(p) for p in body} | {id(p) for p in extra} == {id(p) for p in model.parameters()}
    assert len(extra) == (0 if head == "none" else 2)
    state = model.state_dict()
    assert all(k.startswith(("backbone.", "head.")) for k in state)
    exported = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    fresh, _ = tiny_backbone(seed=99, hidden=True)
    fresh.load_state_dict(exported)
    torch.testing.assert_close(fresh(inputs()), model(inputs())[0])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("no_decay", [False, True])
def test_param_groups(head, no_decay):
    model = DistillStudent(*tiny_backbone(hidden=True), C, head)
    groups = build_param_groups(model, lr=0.1, weight_decay=5e-4, head_lr_scale=0.01,
                                no_decay_norm_bias=no_decay)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    head_ids = {id(p) for p in model.head_parameters()}
    for g in groups:
        in_head = {id(p) in head_ids for p in g["params"]}
        assert in_head == {g["name"].startswith("head")}
        # head_lr_scale is for FC_TS (it reads logits); the parallel head reads features: body lr.
        scaled = g["name"].startswith("head") and head == "serial"
        assert g["lr"] == g["base_lr"] == pytest.approx(0.001 if scaled else 0.1)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 5e-4)
        if g["name"].endswith("no_decay"):
            assert all(p.ndim == 1 for p in g["params"])
    expected = {"body"} | ({"body_no_decay"} if no_decay else set())
    if head != "none":
        expected |= {"head"} | ({"head_no_decay"} if no_decay else set())
    assert {g["name"] for g in groups} == expected
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted as is


def test_invalid_construction():
    backbone, classifier = tiny_backbone()
    with pytest.raises(ValueError, match="serial, parallel, none"):
        DistillStudent(backbone, classifier, C, "series")
    with pytest.raises(ValueError, match="submodule"):
        DistillStudent(backbone, nn.Linear(D, C), C, "serial")
    with pytest.raises(ValueError, match="10 outputs"):
        DistillStudent(backbone, classifier, 10, "serial")


def test_serial_head_runs_in_fp32_under_bf16_autocast():
    """A learned FC_TS a little off the identity (+0.2 % diagonal, 1e-3 off-diagonal) on logits ~10:
    in bf16 (8 mantissa bits) those deviations round away and z_kd == z_cls; the head must run in
    fp32 with autocast off, so z_kd matches the fp32 product of the (bf16) z_cls."""
    backbone, classifier = tiny_backbone()
    model = DistillStudent(backbone.float(), classifier, C, "serial").float()
    with torch.no_grad():
        classifier.weight.mul_(8.0)  # logits of magnitude ~10
        model.head.weight.copy_(torch.eye(C) * 1.002 + 1e-3 * (1 - torch.eye(C)))
    x = inputs().float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z_cls, z_kd = model(x)
        naive = model.head(z_cls)  # the head as it ran before: in bf16 under autocast
    assert z_cls.dtype == torch.bfloat16 and z_kd.dtype == torch.float32
    assert 5 < float(z_cls.abs().max()) < 20
    expected = z_cls.float() @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(z_kd, expected, rtol=1e-6, atol=1e-6)
    # The deviation from the identity survives: z_kd - z_cls is the head's learned part.
    learned = z_cls.float() @ (model.head.weight - torch.eye(C)).T
    torch.testing.assert_close(z_kd - z_cls.float(), learned, rtol=1e-4, atol=1e-5)
    assert float(learned.detach().abs().max()) > 0.01
    # In bf16 the rounding error is as large as the whole learned part: that is what was lost.
    assert float((naive.float() - expected).abs().max()) > 0.25 * float(learned.detach().abs().max())
