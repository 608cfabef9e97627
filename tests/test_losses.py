"""pipeline.losses: the registry, compute_loss's named terms, warm-up and the loss description."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LOSS_NAMES, LossConfig
from pipeline.loss_terms import dist_terms
from pipeline.losses import (
    LOSSES,
    aekt_loss,
    ce_loss,
    compute_loss,
    describe_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    loss_warmup,
    nkd_loss,
    warmup_factor,
)

N, C = 6, 5


def make(seed: int):
    """(student [N, C] requiring grad, teacher [N, C], targets [N]) in float64."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    return student, teacher, torch.randint(0, C, (N,), generator=g)


def aekt_sum(s, t, y, **kw):
    out = aekt_loss(s, t, y, **{"tau": 4.0, "alpha": 1.0, "beta": 8.0, "w_min": 0.0, "w_max": 10.0, **kw})
    return out["explicit"] + out["implicit"]


EXPECTED_TERMS = {
    "ce": {"ce"}, "kd": {"ce", "kd"}, "dkd": {"ce", "tckd", "nckd"},
    "nkd": {"ce", "nkd_target", "nkd_nontarget"}, "dist": {"ce", "dist_inter", "dist_intra"},
    "aekt": {"ce", "explicit", "implicit"},
}


def run_compute(name: str, warmup: float = 1.0, **overrides):
    cfg = LossConfig(name=name, ce_weight=0.5, kd_weight=0.9, **overrides)
    s, t, y = make(3)
    z_cls = 1.5 * s  # distinct from z_kd, to check which term sees which logits
    out = compute_loss(cfg, z_cls=z_cls, z_kd=s, teacher_logits=t, targets=y, warmup=warmup)
    return cfg, (z_cls, s, t, y), out


def test_registry_covers_the_config_choices():
    assert set(LOSSES) == set(LOSS_NAMES) == set(EXPECTED_TERMS)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_compute_loss_terms(name):
    cfg, (z_cls, s, t, y), out = run_compute(name)
    assert set(out.terms) == EXPECTED_TERMS[name]
    torch.testing.assert_close(out.terms["ce"], 0.5 * ce_loss(z_cls, y))
    distill = {
        "ce": lambda: torch.zeros((), dtype=torch.float64),
        "kd": lambda: 0.9 * kd_loss(s, t, tau=cfg.tau),
        "dkd": lambda: dkd_loss(s, t, y, alpha=cfg.alpha, beta=cfg.beta, tau=cfg.tau),
        "nkd": lambda: nkd_loss(s, t, y, gamma=cfg.gamma, tau=cfg.tau),
        "dist": lambda: dist_loss(s, t, beta=cfg.dist_beta, gamma=cfg.dist_gamma, tau=cfg.tau),
        "aekt": lambda: aekt_sum(s, t, y, tau=cfg.tau, alpha=cfg.alpha, beta=cfg.beta),
    }[name]()
    torch.testing.assert_close(out.total, out.terms["ce"] + distill)
    assert out.stats["stat/warmup"] == 1.0
    if name == "aekt":
        assert {"stat/w_mean", "stat/w_min", "stat/w_max", "stat/w_clipped"} <= set(out.stats)
        # Device tensors (no host sync in a training step), detached; floats on request.
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad
                   for k, v in out.stats.items() if k != "stat/warmup")
        values = out.stat_values()
        assert all(isinstance(v, float) for v in values.values())
        assert values["stat/w_mean"] == pytest.approx(float(out.stats["stat/w_mean"]))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_warmup_scales_only_distillation_terms(name):
    _, _, full = run_compute(name, warmup=1.0)
    _, _, warm = run_compute(name, warmup=0.25)
    for key, value in full.terms.items():
        torch.testing.assert_close(warm.terms[key], value if key == "ce" else 0.25 * value)


def test_aekt_switches_reach_the_loss():
    _, (_, s, t, y), out = run_compute("aekt", adaptive="none", explicit="nkd", w_max=3.0)
    expected = aekt_loss(s, t, y, tau=4.0, alpha=1.0, beta=8.0, w_min=0.0, w_max=3.0,
                         adaptive="none", explicit="nkd")
    torch.testing.assert_close(out.terms["explicit"], expected["explicit"])


def test_teacher_is_detached_and_optional_only_for_ce():
    s, t, y = make(0)
    t.requires_grad_()
    out = compute_loss(LossConfig(name="aekt"), z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0)
    out.total.backward()
    assert t.grad is None and s.grad is not None
    compute_loss(LossConfig(name="ce"), z_cls=s, z_kd=s, teacher_logits=None, targets=y, warmup=1.0)
    with pytest.raises(ValueError, match="needs teacher logits"):
        compute_loss(LossConfig(name="kd"), z_cls=s, z_kd=s, teacher_logits=None, targets=y, warmup=1.0)


def test_unknown_loss_name_lists_valid_names():
    s, t, y = make(0)
    with pytest.raises(ValueError, match="ce, kd, dkd, nkd, dist, aekt"):
        compute_loss(LossConfig(name="dkdd"), z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0)
    with pytest.raises(ValueError, match="Valid names"):
        describe_loss(LossConfig(name="dkdd"), 1.0)


@pytest.mark.parametrize("overrides,expected", [
    (dict(name="ce"), "1·ce"),
    # Baselines build no head, whatever loss.head says: the log must not claim one.
    (dict(name="kd", ce_weight=0.1, kd_weight=0.9), "0.1·ce + 0.5·(0.9·kd) [τ=4, head=none]"),
    (dict(name="dkd", head="none"), "1·ce + 0.5·(1·tckd + 8·nckd) [τ=4, head=none]"),
    (dict(name="aekt"), "1·ce + 0.5·(1·w·tckd + 8·nckd) [τ=4, w=clip(sg(p_t^T/p_t^S), 0, 10), head=serial]"),
    (dict(name="aekt", adaptive="none", explicit="nkd", head="parallel"),
     "1·ce + 0.5·(1·nkd_target + 8·nckd) [τ=4, head=parallel]"),
    # DIST's own weights (published 2 / 2), not DKD's beta = 8 or NKD's gamma.
    (dict(name="dist"), "1·ce + 0.5·(2·dist_inter + 2·dist_intra) [τ=4, head=none]"),
    (dict(name="dist", beta=8.0, gamma=5.0, dist_beta=1.0),
     "1·ce + 0.5·(1·dist_inter + 2·dist_intra) [τ=4, head=none]"),
])
def test_describe_loss(overrides, expected):
    assert describe_loss(LossConfig(**overrides), 0.5) == expected


@pytest.mark.parametrize("epoch,warmup_epochs,expected", [
    (1, 20, 0.05), (10, 20, 0.5), (20, 20, 1.0), (240, 20, 1.0), (0, 20, 0.0), (1, 0, 1.0), (3, 2.5, 1.0),
])
def test_warmup_factor(epoch, warmup_epochs, expected):
    assert warmup_factor(epoch, warmup_epochs) == pytest.approx(expected)


def test_warmup_factor_rejects_negative():
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_factor(1, -1)


def _terms_and_grads(terms_fn, cfg, z_cls, z_kd, teacher, y, warmup):
    z_cls, z_kd = z_cls.clone().requires_grad_(), z_kd.clone().requires_grad_()
    out = compute_loss(cfg, z_cls=z_cls, z_kd=z_kd, teacher_logits=teacher, targets=y, warmup=warmup,
                       terms_fn=terms_fn)
    grads = torch.autograd.grad(out.total, (z_cls, z_kd))
    return out, grads


def test_compiled_loss_matches_eager():
    """train.compile_loss: the torch.compile'd AEKT loss gives the eager terms, stats and gradients,
    across a batch-size change (an epoch's short last batch) and two warm-up factors (applied outside
    the compiled part, so no recompile per epoch). float32, as in training."""
    from pipeline.losses import compiled_loss_terms

    cfg = LossConfig(name="aekt")
    compiled = compiled_loss_terms(cfg)
    g = torch.Generator().manual_seed(3)
    for n, warmup in ((64, 0.5), (17, 1.0), (64, 1.0)):
        z_cls, z_kd, teacher = (3 * torch.randn(n, 10, generator=g) for _ in range(3))
        y = torch.randint(0, 10, (n,), generator=g)
        ref, ref_grads = _terms_and_grads(None, cfg, z_cls, z_kd, teacher, y, warmup)
        got, got_grads = _terms_and_grads(compiled, cfg, z_cls, z_kd, teacher, y, warmup)
        assert set(got.terms) == set(ref.terms) and set(got.stats) == set(ref.stats)
        for key in ref.terms:
            torch.testing.assert_close(got.terms[key], ref.terms[key], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(list(got.stat_values().values())),
                                   torch.tensor(list(ref.stat_values().values())), rtol=1e-5, atol=1e-6)
        for a, b in zip(got_grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_loss_falls_back_to_eager_when_compilation_fails(monkeypatch, caplog):
    """No C++ compiler / Triton: one warning naming the setting, then the eager loss (same numbers).
    torch.compile is replaced by a compiler that fails, as a machine without a toolchain does."""
    from pipeline import losses

    def broken_compile(fn):
        def call(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    cfg = LossConfig(name="dkd")
    terms_fn = losses.compiled_loss_terms(cfg)
    s, t, y = make(1)
    with caplog.at_level("WARNING", logger="pipeline.losses"):
        out = compute_loss(cfg, z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0, terms_fn=terms_fn)
        again = compute_loss(cfg, z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0, terms_fn=terms_fn)
    ref = compute_loss(cfg, z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0)
    torch.testing.assert_close(out.total, ref.total)
    torch.testing.assert_close(again.total, ref.total)
    warnings = [r for r in caplog.records if "compile_loss" in r.getMessage()]
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0].getMessage()


def test_compiled_loss_keeps_input_errors():
    """A wrong input is the loss's own ValueError, not a silent fallback."""
    from pipeline.losses import compiled_loss_terms

    cfg = LossConfig(name="kd")
    with pytest.raises(ValueError, match="needs teacher logits"):
        compute_loss(cfg, z_cls=torch.zeros(4, 3), z_kd=torch.zeros(4, 3), teacher_logits=None,
                     targets=torch.zeros(4, dtype=torch.long), warmup=1.0, terms_fn=compiled_loss_terms(cfg))


def test_dist_uses_its_own_weights_not_dkds_beta():
    s, t, y = make(0)
    base = LossConfig(name="dist")
    terms = compute_loss(base, z_cls=s, z_kd=s, teacher_logits=t, targets=y, warmup=1.0).terms
    expected = dist_terms(s, t, beta=2.0, gamma=2.0, tau=4.0)
    for key in ("dist_inter", "dist_intra"):
        torch.testing.assert_close(terms[key], expected[key])
    # beta / gamma belong to DKD-AEKT / NKD: changing them leaves DIST unchanged.
    other = compute_loss(LossConfig(name="dist", beta=8.0, gamma=7.0), z_cls=s, z_kd=s, teacher_logits=t,
                         targets=y, warmup=1.0).terms
    assert all(torch.equal(terms[k], other[k]) for k in terms)


@pytest.mark.parametrize("name,ramped", [("ce", False), ("kd", False), ("nkd", False), ("dist", False),
                                         ("dkd", True), ("aekt", True)])
def test_warmup_applies_only_to_the_losses_whose_recipe_has_one(name, ramped):
    cfg = LossConfig(name=name, warmup_epochs=4)
    assert loss_warmup(cfg, 1) == (0.25 if ramped else 1.0)
    assert loss_warmup(cfg, 4) == 1.0
    # Explicit per loss: a KD run with a warm-up asks for it by name.
    assert loss_warmup(LossConfig(name=name, warmup_epochs=4, warmup_losses=(name,)), 1) == (
        1.0 if name == "ce" else 0.25)
    assert loss_warmup(LossConfig(name=name, warmup_epochs=0), 1) == 1.0


def test_warmup_losses_are_validated():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="loss.warmup_losses: 'dkdd' is not one of"):
        LossConfig.from_params({"warmup_losses": ["kd", "dkdd"]})
    assert LossConfig.from_params({"warmup_losses": []}).warmup_losses == ()
