"""Statistics of `aekt inspect`: pure functions of cached teacher logits ``[n, C]`` and labels ``[n]``
(float64 from log-softmax), reduced per (view, sample) so memory grows with sample-views, not
sample-views x classes. Definitions: docs/inspect.md."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017
HIST_BINS = 20
TOP_PAIRS = 10
QUANTILES = (0.1, 0.5, 0.9)


def log_softmax(logits: np.ndarray, tau: float) -> np.ndarray:
    """float64 ``log softmax(logits / tau)`` ``[n, C]``; rows may hold -inf (masked classes)."""
    z = logits.astype(np.float64) / tau
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def target_confidence(logits: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """p_t = softmax(z / tau)[y] per row, ``[n]``."""
    return np.exp(log_softmax(logits, tau)[np.arange(len(labels)), labels])


def nontarget_entropy(logits: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """Entropy (nats) of the non-target distribution p̂ ``[n]``: a softmax over z / tau with the
    target masked to -inf (AEKT.md: never p_j / (1 - p_t), which loses precision as p_t -> 1)."""
    z = logits.astype(np.float64)
    z[np.arange(len(labels)), labels] = -np.inf
    logp = log_softmax(z, tau)
    finite = np.where(np.isfinite(logp), logp, 0.0)  # 0 · log 0 = 0 for the masked target
    return -(np.exp(logp) * finite).sum(axis=1)


def summarise_logits(logits: np.ndarray, labels: np.ndarray, tau: float) -> dict[str, np.ndarray]:
    """Per-row summaries that every statistic below is computed from (logits are then dropped)."""
    logp = log_softmax(logits, tau)
    return {"p_t": np.exp(logp[np.arange(len(labels)), labels]), "p_max": np.exp(logp.max(axis=1)),
            "pred": logits.argmax(axis=1), "nt_entropy": nontarget_entropy(logits, labels, tau)}


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability diagram and ECE = sum_b n_b / N · |acc_b - conf_b| over equal-width bins
    (lo, hi] of the max probability (the first bin also holds 0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.digitize(confidence, edges[1:-1], right=True)
    counts = np.bincount(idx, minlength=bins)
    hits = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    conf = np.bincount(idx, weights=confidence, minlength=bins)
    safe = np.maximum(counts, 1)
    return {"ece": float(np.abs(hits - conf).sum() / max(len(confidence), 1)),
            "bins": [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(counts[b]),
                      "accuracy": float(hits[b] / safe[b]) if counts[b] else None,
                      "confidence": float(conf[b] / safe[b]) if counts[b] else None}
                     for b in range(bins)]}


def confidence_histogram(p_t: np.ndarray, correct: np.ndarray, bins: int = HIST_BINS) -> dict[str, list]:
    """Counts of p_t in equal-width bins over [0, 1], split by whether the teacher's argmax is right."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"edges": edges.tolist(), "correct": np.histogram(p_t[correct], edges)[0].tolist(),
            "wrong": np.histogram(p_t[~correct], edges)[0].tolist()}


def confusion_counts(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` int64, row = label, column = teacher argmax, counted over sample-views."""
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def top_offdiagonal(matrix: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int]]:
    """(row, column) of the ``top`` largest non-zero off-diagonal entries; ties by (row, column)."""
    m = np.abs(matrix.astype(np.float64))
    np.fill_diagonal(m, 0.0)
    rows, cols = np.nonzero(m)
    order = np.lexsort((cols, rows, -m[rows, cols]))[:top]
    return [(int(rows[i]), int(cols[i])) for i in order]


def view_agreement(pred: np.ndarray) -> dict[str, Any] | None:
    """Agreement of the teacher's argmax across views; ``pred`` is ``[V, n]`` (every sample has all
    V views). None for fewer than two views."""
    if pred.shape[0] < 2 or pred.shape[1] == 0:
        return None
    pairwise = [float((pred[a] == pred[b]).mean()) for a, b in combinations(range(pred.shape[0]), 2)]
    return {"samples": int(pred.shape[1]), "views": int(pred.shape[0]),
            "all_views_agree": float((pred == pred[0]).all(axis=0).mean()),
            "mean_pairwise": float(np.mean(pairwise))}


def class_summary(values: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Mean, q10/q50/q90 of p_t and accuracy of one class's sample-views."""
    q = np.quantile(values, QUANTILES)
    return {"mean_pt": float(values.mean()), "q10": float(q[0]), "q50": float(q[1]),
            "q90": float(q[2]), "accuracy": float(correct.mean())}
