"""Paired-by-seed statistics and one-line method descriptions, shared by the experiment renderers.

Pure functions of the cells (``{"method", "seed", "final_top1", "best_top1"}``): no torch, no files, so
both renderers (``experiments.markdown``, ``experiments.cifar10_real``) import them without a circle.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np
from scipy import stats

REFERENCE = "dkd"


def history_columns(text: str) -> dict[str, list[float]]:
    """The trainer's per-epoch CSV (plots/train.csv) as columns, 5 significant digits; columns with an
    empty cell (e.g. a term one loss does not log) are left out."""
    rows = list(csv.DictReader(io.StringIO(text)))
    return {k: [float(f"{float(r[k]):.5g}") for r in rows] for k in rows[0] if all(r[k] for r in rows)}
PAIRS = (("kd", "ce"), ("dkd", "kd"), ("aekt", "kd"), ("aekt", "ce"), ("aekt", "aekt_adaptive_none"),
         ("aekt", "aekt_explicit_nkd"), ("aekt", "aekt_head_parallel"), ("aekt", "aekt_head_none"),
         ("aekt_head_none", "dkd_alpha_mean_w"), ("aekt_adaptive_none", "aekt_adaptive_none_head_none"))


def by_method(cells: list[dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for cell in cells:
        out.setdefault(cell["method"], {})[cell["seed"]] = 100.0 * cell[key]
    return out


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """a − b over the seeds both have: mean, 95% t-interval, t-test and sign-test p."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    if n < 2:
        t_p = float("nan")
    elif sd > 0:
        t_p = float(stats.ttest_1samp(d, 0.0).pvalue)
    else:  # every seed moved by the same amount: certain if that amount is not 0
        t_p = 0.0 if mean != 0 else 1.0
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    sign_p = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"n": n, "diffs": d.tolist(), "mean": mean, "sd": sd, "ci95": [mean - half, mean + half],
            "t_p": t_p, "wins": wins, "losses": losses, "ties": n - wins - losses, "sign_p": sign_p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (NaN stays NaN)."""
    order = sorted(range(len(pvalues)), key=lambda i: (np.isnan(pvalues[i]), pvalues[i]))
    adjusted, running, m = [float("nan")] * len(pvalues), 0.0, sum(not np.isnan(p) for p in pvalues)
    for rank, i in enumerate(order):
        if not np.isnan(pvalues[i]):
            running = max(running, min(1.0, (m - rank) * pvalues[i]))
            adjusted[i] = running
    return adjusted


def analyse(payload: dict[str, Any]) -> dict[str, Any]:
    final, best = by_method(payload["cells"], "final_top1"), by_method(payload["cells"], "best_top1")
    summary = {m: {"n": len(v), "final_mean": float(np.mean(list(v.values()))),
                   "final_std": float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else float("nan"),
                   "best_mean": float(np.mean(list(best[m].values()))),
                   "best_std": float(np.std(list(best[m].values()), ddof=1)) if len(v) > 1 else float("nan"),
                   "final": v, "best": best[m]} for m, v in final.items()}
    vs_ref = {m: paired(final[m], final[REFERENCE]) for m in final if m != REFERENCE and REFERENCE in final}
    vs_ref = {m: r for m, r in vs_ref.items() if r}
    for r, p in zip(vs_ref.values(), holm([r["t_p"] for r in vs_ref.values()]), strict=True):
        r["t_p_holm"] = p
    pairs = {f"{a} − {b}": paired(final[a], final[b]) for a, b in PAIRS if a in final and b in final}
    return {"summary": summary, "vs_reference": vs_ref, "pairs": {k: v for k, v in pairs.items() if v}}


def describe(loss: dict[str, Any]) -> str:
    """The cell's loss settings in one line (what differs between methods, plus τ)."""
    name, tau = loss["name"], f"τ={loss['tau']:g}"
    text = {"ce": "CE only",
            "kd": f"{loss['ce_weight']:g}·CE + {loss['kd_weight']:g}·KD, {tau}",
            "dkd": f"CE + {loss['alpha']:g}·TCKD + {loss['beta']:g}·NCKD, {tau}",
            "nkd": f"CE + NKD (γ={loss['gamma']:g}), {tau}",
            # results written before DIST had its own keys ran it with DKD's beta and NKD's gamma
            "dist": f"CE + DIST (β={loss.get('dist_beta', loss['beta']):g}, "
                    f"γ={loss.get('dist_gamma', loss['gamma']):g}), {tau}",
            "aekt": f"CE + {loss['alpha']:g}·{'w·' if loss['adaptive'] == 'ratio' else ''}"
                    f"{'TCKD' if loss['explicit'] == 'binary_kl' else 'NKD-target'} + {loss['beta']:g}·NCKD, "
                    f"{tau}, head={loss['head']}"}[name]
    # Results written before warmup_losses existed warmed up every distillation loss.
    warmed = name in loss.get("warmup_losses", ("kd", "dkd", "nkd", "dist", "aekt")) and loss["warmup_epochs"] > 0
    return text + (f", warm-up {loss['warmup_epochs']:g} ep" if warmed else "")


def beyond_noise(r: dict[str, Any]) -> bool:
    lo, hi = r["ci95"]
    return bool(not np.isnan(lo) and (lo > 0 or hi < 0))


def set_flags(overrides: dict[str, dict[str, Any]], present: dict[str, Any] | None = None) -> str:
    """`dvc exp run -S` flags; a key that ``present`` (params.yaml) lacks, e.g. one a recipe sets,
    needs a leading "+" to be added."""
    return " ".join(f"-S {'+' if present is not None and k not in present.get(s, {}) else ''}{s}.{k}={v}"
                    for s, values in overrides.items() for k, v in values.items())
