"""Model performance before labels arrive: the expected primary metric from the model's own scores.

A calibrated classifier's score is the probability of its label, so the metric a window *will* show once
labelled can be estimated without labels by taking its expectation with ``y_i ~ Bernoulli(p_i)``
(independent rows), the idea of NannyML's confidence-based performance estimation (CBPE). The estimate is
only as good as the calibration: it follows covariate shift (the scores move with the inputs) but cannot
see concept drift (P(y | x) changing), which the realised metric shows once labels join.

Binary (``p`` = P(positive)):

- accuracy (predict 1 when p ≥ 0.5): E = mean(max(p, 1 − p)).
- brier: E[(p − y)²] = p(1 − p)² + (1 − p)p² = p(1 − p), averaged.
- log_loss: E[−y ln p − (1 − y) ln(1 − p)] = binary entropy of p, averaged (p clipped as the metric does).
- auc: AUC = U / (P·N) with U = Σ_{i≠j} y_i (1 − y_j) h(s_i, s_j), h = 1 when s_i > s_j, ½ on ties, and
  P·N = Σ_{i≠j} y_i (1 − y_j). Under independence both expectations are exact sums over pairs,
  E[U] = Σ_{i≠j} p_i (1 − p_j) h(s_i, s_j) and E[P·N] = Σp·Σ(1 − p) − Σ p(1 − p); the estimate is their
  ratio (the area under CBPE's expected ROC curve, self-pairs excluded), whose bias is O(1/n). Both sums
  take one sort: each row's score is compared with the summed (1 − p) of the rows scored below it.

Multiclass (rows of class probabilities): accuracy = mean of the row maxima, log_loss = mean row entropy.
Regression: no estimate (None); only the realised metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from driftloop.core.declarations import METRICS
from driftloop.core.model_metrics import EPS, FUNCTIONS

ESTIMABLE = {"binary": ("auc", "log_loss", "accuracy", "brier"), "multiclass": ("accuracy", "log_loss")}


def _check_metric(task: str, metric: str) -> None:
    if metric not in METRICS or task not in METRICS[metric][0]:
        fits = [m for m, (tasks, _) in METRICS.items() if task in tasks]
        raise ValueError(f"metric {metric!r} does not fit a {task} model; use one of {', '.join(fits)}")


def expected_auc(p: np.ndarray, q: np.ndarray | None = None) -> float:
    """Expected ROC AUC of scores ``p`` when each row is positive with probability ``q`` (default ``p``;
    see module doc)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    q = p if q is None else np.clip(np.asarray(q, np.float64), 0.0, 1.0)
    order = np.argsort(p, kind="stable")
    ps, qp = p[order], q[order]
    qs = 1.0 - qp
    _, start, sizes = np.unique(ps, return_index=True, return_counts=True)
    group_neg = np.add.reduceat(qs, start)  # summed (1 − q) of each group of tied scores
    below = np.cumsum(group_neg) - group_neg  # ... of the rows scored strictly lower
    g = np.repeat(np.arange(start.size), sizes)
    num = float(np.sum(qp * (below[g] + 0.5 * (group_neg[g] - qs))))  # ties count half, self excluded
    den = float(q.sum() * (1.0 - q).sum() - np.sum(q * (1.0 - q)))
    return num / den if den > 0 else math.nan


def estimate(task: str, metric: str, scores: np.ndarray, probabilities: np.ndarray | None = None,
             calibrated: np.ndarray | None = None) -> float | None:
    """Label-free expected value of ``metric`` on a window; None for regression.

    Binary: ``scores`` = the model's P(positive); ``calibrated`` = the probability of a positive per row
    (the scores through the reference's calibration map; default: the scores themselves, i.e. assumed
    calibrated). Multiclass: ``probabilities`` ``(n, K)`` (required). NaN for an empty window; ValueError
    for a metric that does not fit the task."""
    _check_metric(task, metric)
    if task == "regression":
        return None
    if task == "multiclass":
        if probabilities is None:
            raise ValueError("a multiclass estimate needs the class probabilities")
        pr = np.clip(np.asarray(probabilities, np.float64), EPS, 1 - EPS)
        if pr.shape[0] == 0:
            return math.nan
        pr = pr / pr.sum(axis=1, keepdims=True)
        if metric == "accuracy":
            return float(np.mean(pr.max(axis=1)))
        return float(np.mean(-np.sum(pr * np.log(pr), axis=1)))
    p = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    q = p if calibrated is None else np.clip(np.asarray(calibrated, np.float64), 0.0, 1.0)
    if p.size == 0:
        return math.nan
    if metric == "auc":
        return expected_auc(p, q)
    if metric == "accuracy":
        return float(np.mean(np.where(p >= 0.5, q, 1.0 - q)))
    if metric == "brier":
        return float(np.mean(q * (1.0 - p) ** 2 + (1.0 - q) * p**2))
    pc = np.clip(p, EPS, 1 - EPS)
    return float(np.mean(-(q * np.log(pc) + (1.0 - q) * np.log(1.0 - pc))))


def calibration(scores: np.ndarray, labels: np.ndarray, bins: int = 10,
                min_rows: int = 50) -> Callable[[np.ndarray], np.ndarray] | None:
    """A binary model's calibration map fitted on labelled reference rows (CBPE calibrates before it
    estimates): quantile bins of the scores, each bin's positive share (shrunk toward the overall share),
    made non-decreasing and interpolated between bin centres. None with fewer than ``2 * min_rows`` rows."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    ok = np.isfinite(s) & np.isfinite(y)
    s, y = s[ok], y[ok]
    if len(s) < 2 * min_rows:
        return None
    n_bins = max(2, min(bins, len(s) // min_rows))
    edges = np.unique(np.quantile(s, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    keep = counts > 0
    centre = np.bincount(idx, weights=s, minlength=len(counts))[keep] / counts[keep]
    share = (np.bincount(idx, weights=y, minlength=len(counts))[keep] + y.mean()) / (counts[keep] + 1)
    share = np.maximum.accumulate(share)

    def apply(p: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(p, np.float64), centre, share)

    return apply


def realised(task: str, metric: str, labels: np.ndarray, outputs: np.ndarray) -> float:
    """The metric on labelled rows (``core.model_metrics``); ValueError for a metric not fitting the task."""
    _check_metric(task, metric)
    return FUNCTIONS[metric](np.asarray(labels), np.asarray(outputs))


def outputs(frame: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores, class probabilities or None) of a frame shaped like a version's reference sample:
    ``score``, and for a multiclass model ``p0..pK-1``."""
    scores = frame["score"].to_numpy(np.float64)
    if task != "multiclass":
        return scores, None
    k = 0
    while f"p{k}" in frame:
        k += 1
    return scores, frame[[f"p{i}" for i in range(k)]].to_numpy(np.float64)


def relative_drop(metric_value: float, reference_value: float, higher_is_better: bool) -> float:
    """How much worse ``metric_value`` is than ``reference_value``, relative (positive = worse).

    (reference − value) / |reference| when higher is better, (value − reference) / |reference| otherwise;
    with a zero reference the absolute difference; NaN when either value is NaN or infinite."""
    if not (math.isfinite(metric_value) and math.isfinite(reference_value)):
        return math.nan
    worse = reference_value - metric_value if higher_is_better else metric_value - reference_value
    scale = abs(reference_value)
    return worse / scale if scale > 0 else worse


def dropped(metric_value: float, reference_value: float, higher_is_better: bool, tolerance: float) -> bool:
    """Whether ``metric_value`` is worse than ``reference_value`` by more than ``tolerance`` (see
    :func:`relative_drop`); never when either value is NaN or infinite (nothing to judge)."""
    drop = relative_drop(metric_value, reference_value, higher_is_better)
    return math.isfinite(drop) and drop > tolerance
