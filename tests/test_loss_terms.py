"""pipeline.loss_terms: identities, closed-form gradients (float64), stability and the AEKT switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.loss_terms import (
    aekt_loss,
    ce_loss,
    dist_loss,
    dkd_loss,
    kd_loss,
    nckd,
    nkd_loss,
    nkd_target,
    tckd,
)

SEEDS = range(6)
TAUS = [0.5, 1.0, 4.0, 20.0]
N, C = 6, 5


def make(seed: int, n: int = N, c: int = C, scale: float = 3.0, dtype=torch.float64):
    """(student, teacher, targets) with the student requiring grad."""
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    teacher = (scale * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    return student, teacher, targets


def aekt_sum(s, t, y, **kw):
    out = aekt_loss(s, t, y, **{"tau": 4.0, "alpha": 1.0, "beta": 8.0, "w_min": 0.0, "w_max": 10.0, **kw})
    return out["explicit"] + out["implicit"]


# Every loss with a default setting, as a function of (student, teacher, targets, tau).
LOSS_FNS = {
    "ce": lambda s, t, y, tau: ce_loss(s, y),
    "kd": lambda s, t, y, tau: kd_loss(s, t, tau=tau),
    "tckd": lambda s, t, y, tau: tckd(s, t, y, tau=tau),
    "nckd": lambda s, t, y, tau: nckd(s, t, y, tau=tau),
    "dkd": lambda s, t, y, tau: dkd_loss(s, t, y, alpha=1.0, beta=8.0, tau=tau),
    "nkd": lambda s, t, y, tau: nkd_loss(s, t, y, gamma=1.5, tau=tau),
    "dist": lambda s, t, y, tau: dist_loss(s, t, beta=2.0, gamma=2.0, tau=tau),
    "aekt": lambda s, t, y, tau: aekt_sum(s, t, y, tau=tau),
    "aekt_none": lambda s, t, y, tau: aekt_sum(s, t, y, tau=tau, adaptive="none"),
    "aekt_nkd": lambda s, t, y, tau: aekt_sum(s, t, y, tau=tau, explicit="nkd"),
}
ZERO_AT_EQUALITY = ["kd", "tckd", "nckd", "dkd", "dist", "aekt", "aekt_none"]


def probs(z, tau):
    return torch.softmax(z.detach().double() / tau, dim=1)


def grad(loss, z):
    (g,) = torch.autograd.grad(loss, z)
    return g


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_kd_is_tckd_plus_weighted_nckd_per_sample(seed, tau):
    s, t, y = make(seed)
    kd_rows = torch.stack([kd_loss(s[i:i + 1], t[i:i + 1], tau=tau) for i in range(N)])
    pt_t = probs(t, tau).gather(1, y[:, None]).squeeze(1)
    tc, nc = tckd(s, t, y, tau=tau, reduction="none"), nckd(s, t, y, tau=tau, reduction="none")
    expected = tc + (1 - pt_t) * nc
    torch.testing.assert_close(kd_rows, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_kd_matches_naive_reference(seed):
    s, t, y = make(seed)
    p_s, p_t = probs(s, 4.0), probs(t, 4.0)
    expected = 16 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(kd_loss(s, t, tau=4.0), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (1.0, 2.0, 1.0), (0.5, 0.0, 2.0)])
def test_aekt_without_adaptation_equals_dkd_exactly(seed, alpha, beta, tau):
    s, t, y = make(seed)
    aekt = aekt_sum(s, t, y, tau=tau, alpha=alpha, beta=beta, adaptive="none")
    dkd = dkd_loss(s, t, y, alpha=alpha, beta=beta, tau=tau)
    assert torch.equal(aekt, dkd)
    assert torch.equal(grad(aekt, s), grad(dkd, s))


def target_split(s, t, y, tau):
    """Student/teacher probabilities at tau, the target mask, and each row's p_t as a column."""
    p_s, p_t = probs(s, tau), probs(t, tau)
    mask = torch.nn.functional.one_hot(y, C).bool()
    return p_s, p_t, mask, p_s[mask][:, None], p_t[mask][:, None]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_nckd_gradient_closed_form(seed, tau):
    s, t, y = make(seed)
    g = grad(nckd(s, t, y, tau=tau, reduction="none").sum(), s)
    p_s, p_t, mask, pt_s, pt_t = target_split(s, t, y, tau)
    q_s, q_t = (p_s / (1 - pt_s)).masked_fill(mask, 0), (p_t / (1 - pt_t)).masked_fill(mask, 0)
    torch.testing.assert_close(g, tau * (q_s - q_t))
    r = (1 - pt_s) / (1 - pt_t)
    torch.testing.assert_close(g, (tau / (1 - pt_s) * (p_s - r * p_t)).masked_fill(mask, 0))
    assert torch.all(g[mask] == 0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", TAUS)
def test_tckd_gradient_closed_form(seed, tau):
    s, t, y = make(seed)
    g = grad(tckd(s, t, y, tau=tau, reduction="none").sum(), s)
    p_s, p_t, mask, pt_s, pt_t = target_split(s, t, y, tau)
    expected = torch.where(mask, tau * (pt_s - pt_t), tau * p_s / (1 - pt_s) * (pt_t - pt_s))
    torch.testing.assert_close(g, expected)


def ratio_weights(s, t, y, tau, w_min, w_max):
    p_s, p_t = probs(s, tau), probs(t, tau)
    return (p_t.gather(1, y[:, None]) / p_s.gather(1, y[:, None])).squeeze(1).clamp(w_min, w_max)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("explicit", ["binary_kl", "nkd"])
@pytest.mark.parametrize("w_max", [1.5, 1e9])
def test_aekt_explicit_gradient_treats_w_as_constant(seed, explicit, w_max):
    s, t, y = make(seed)
    tau, alpha = 2.0, 0.7
    out = aekt_loss(s, t, y, tau=tau, alpha=alpha, beta=8.0, w_min=0.2, w_max=w_max, explicit=explicit)
    w = ratio_weights(s, t, y, tau, 0.2, w_max)
    per_sample = (tckd(s, t, y, tau=tau, reduction="none") if explicit == "binary_kl"
                  else nkd_target(s, t, y, reduction="none"))
    expected = alpha * (w * per_sample).mean()
    torch.testing.assert_close(out["explicit"], expected)
    torch.testing.assert_close(grad(out["explicit"], s), grad(expected, s))
    torch.testing.assert_close(out["stat/w_mean"], w.mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_w_is_clipped_to_its_bounds(seed):
    s, t, y = make(seed)
    rows = torch.arange(N)
    sure_s, unsure_s, sure_t, unsure_t = s.detach().clone(), s.detach().clone(), t.clone(), t.clone()
    sure_s[rows, y] += 50.0
    unsure_s[rows, y] -= 50.0
    sure_t[rows, y] += 50.0
    unsure_t[rows, y] -= 50.0
    out = aekt_loss(unsure_s, sure_t, y, tau=1.0, alpha=1.0, beta=8.0, w_min=0.3, w_max=2.5)
    assert out["stat/w_min"] == out["stat/w_max"] == 2.5
    assert out["stat/w_clipped"] == 1.0
    out = aekt_loss(sure_s, unsure_t, y, tau=1.0, alpha=1.0, beta=8.0, w_min=0.3, w_max=2.5)
    assert out["stat/w_min"] == out["stat/w_max"] == 0.3
    assert all(not v.requires_grad for k, v in out.items() if k.startswith("stat/"))


@pytest.mark.parametrize("name", ZERO_AT_EQUALITY)
@pytest.mark.parametrize("seed", SEEDS)
def test_zero_loss_and_gradient_when_student_equals_teacher(name, seed):
    s, _, y = make(seed)
    loss = LOSS_FNS[name](s, s.detach().clone(), y, 4.0)
    torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad(loss, s), torch.zeros_like(s), atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_nkd_matches_reference(seed, tau):
    s, t, y = make(seed)
    gamma = 1.5
    mask = torch.nn.functional.one_hot(y, C).bool()
    p1_s, p1_t = probs(s, 1.0), probs(t, 1.0)
    target = -(p1_t[mask] * p1_s[mask].log()).mean()
    p_s, p_t = probs(s, tau), probs(t, tau)
    q_s, q_t = p_s / (1 - p_s[mask][:, None]), p_t / (1 - p_t[mask][:, None])
    nontarget = -(q_t * q_s.log()).masked_fill(mask, 0).sum(1).mean()
    torch.testing.assert_close(nkd_loss(s, t, y, gamma=gamma, tau=tau), target + gamma * tau**2 * nontarget)
    # Not zero at S = T: a cross-entropy, equal to the entropies there.
    eq = nkd_loss(t, t, y, gamma=gamma, tau=tau)
    entropy = -(q_t * q_t.log()).masked_fill(mask, 0).sum(1).mean()
    torch.testing.assert_close(eq, -(p1_t[mask] * p1_t[mask].log()).mean() + gamma * tau**2 * entropy)
    assert eq > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_numpy_pearson(seed, tau):
    s, t, _ = make(seed)
    p_s, p_t = probs(s, tau).numpy(), probs(t, tau).numpy()
    inter = np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(N)])
    intra = np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(C)])
    expected = 2.0 * tau**2 * (1 - inter) + 3.0 * tau**2 * (1 - intra)
    assert dist_loss(s, t, beta=2.0, gamma=3.0, tau=tau).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", list(LOSS_FNS))
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_invariant_to_per_row_constant(name, seed):
    s, t, y = make(seed)
    shift = 100 * torch.randn(N, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(LOSS_FNS[name](s + shift, t - shift, y, 4.0), LOSS_FNS[name](s, t, y, 4.0))


@pytest.mark.parametrize("name", list(LOSS_FNS))
@pytest.mark.parametrize("tau", TAUS)
def test_finite_at_extreme_logits(name, tau):
    s, t, y = make(0, n=8, c=10, scale=1.0, dtype=torch.float32)
    s = (100 * torch.sign(s.detach())).requires_grad_()  # magnitude 100, student and teacher disagree
    t = 100 * torch.tanh(3 * t)
    loss = LOSS_FNS[name](s, t, y, tau)
    assert torch.isfinite(loss) and torch.isfinite(grad(loss, s)).all()


@pytest.mark.parametrize("name", list(LOSS_FNS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_losses(name, dtype):
    s, t, y = make(1, dtype=dtype)
    loss = LOSS_FNS[name](s, t, y, 4.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grad(loss, s).dtype == dtype


def test_reduction_and_switch_errors():
    s, t, y = make(0)
    assert tckd(s, t, y, tau=4.0, reduction="none").shape == (N,)
    assert nckd(s, t, y, tau=4.0, reduction="none").shape == (N,)
    with pytest.raises(ValueError, match="mean, none"):
        tckd(s, t, y, tau=4.0, reduction="sum")
    with pytest.raises(ValueError, match="ratio, none"):
        aekt_sum(s, t, y, adaptive="sigmoid")
    with pytest.raises(ValueError, match="binary_kl, nkd"):
        aekt_sum(s, t, y, explicit="ce")
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(s, t[:, :3], tau=4.0)

