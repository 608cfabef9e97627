"""Statistics, tables and the plot for ``bench.experiments``: docs/results.md is written from the JSON alone.

Seeds are paired: train.seed fixes the student's initialisation and the data order, and both are the
same for every method (the serial head starts at the identity), so a method's per-seed difference
to a reference cancels the seed's own luck. With 5 seeds that is still little: the t-interval is
wide, and a two-sided sign test cannot go below p = 2/2^5 = 0.0625.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

PACKAGES = ("torch", "numpy", "scipy", "accelerate", "zarr", "webdataset", "dvc", "matplotlib")
REFERENCE = "dkd"
# (a, b): report a − b per seed. Chosen before the run: the question and each AEKT switch.
PAIRS = (("kd", "ce"), ("dkd", "kd"), ("aekt", "kd"), ("aekt", "ce"), ("aekt", "aekt_adaptive_none"),
         ("aekt", "aekt_explicit_nkd"), ("aekt", "aekt_head_parallel"), ("aekt", "aekt_head_none"),
         ("aekt_head_none", "dkd_alpha_mean_w"), ("aekt_adaptive_none", "aekt_adaptive_none_head_none"))


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu_model": model,
            "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions}


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
    t_p = float(stats.ttest_1samp(d, 0.0).pvalue) if n > 1 and sd > 0 else (1.0 if n > 1 else float("nan"))
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


def write_all(payload: dict[str, Any], *, json_path: Path, doc_path: Path, plot_path: Path) -> None:
    payload = {**payload, "analysis": analyse(payload)}
    for path in (json_path, doc_path, plot_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    plot(payload, plot_path)
    doc_path.write_text(render(payload, json_path=json_path, plot_path=plot_path, doc_path=doc_path))


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["analysis"]["summary"]
    methods = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.3, 1]})
    colors = {"baseline": "tab:blue", "aekt": "tab:red", "ablation": "tab:orange", "control": "tab:green"}
    for i, m in enumerate(methods):
        s, color = summary[m], colors.get(payload["methods"][m]["group"], "grey")
        seeds = sorted(s["final"])
        left.scatter([s["final"][k] for k in seeds], [i + 0.08 * (k - 2) for k in seeds], s=12, color=color,
                     alpha=0.6)
        left.errorbar(s["final_mean"], i, xerr=0 if np.isnan(s["final_std"]) else s["final_std"], fmt="o",
                      color=color, ms=7, capsize=4, mfc="white")
    left.set_yticks(range(len(methods)), methods)
    left.invert_yaxis()
    left.axvline(100 * payload["stage1"]["teacher_top1"], color="black", ls=":", lw=1, label="teacher")
    left.set_xlabel("final-epoch test top-1 (%): dots = seeds, circle = mean ± std")
    left.legend(loc="lower left")
    left.grid(axis="x", alpha=0.3)
    for m in [m for m in ("ce", "kd", "dkd", "aekt", "aekt_head_none") if m in summary]:
        curves = np.array([c["curve"] for c in payload["cells"] if c["method"] == m]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
        right.plot(epochs, curves.mean(0), label=m)
        right.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
    right.set_xlabel("epoch")
    right.set_ylabel("test top-1 (%), mean and min-max over seeds")
    right.grid(alpha=0.3)
    right.legend(loc="lower right")
    fig.suptitle(f"digits: {payload['params']['student']['arch']} student, "
                 f"{payload['params']['teacher']['arch']} teacher, {len(summary[methods[0]]['final'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(payload: dict[str, Any], *, json_path: Path, plot_path: Path, doc_path: Path) -> str:
    summary = payload["analysis"]["summary"]
    lines = ["# Results", "", "| method | final top-1 | best-epoch top-1 |", "|---|---|---|"]
    lines += [f"| {m} | {s['final_mean']:.2f} ± {s['final_std']:.2f} | {s['best_mean']:.2f} |"
              for m, s in summary.items()]
    return "\n".join(lines) + "\n"
