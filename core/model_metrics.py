"""Evaluation metrics of a model's outputs against labels, one function per primary metric.

Outputs are what a model returns (``registry.verify.Scorer``): binary P(positive) ``(n,)``, regression
values ``(n,)``, multiclass probabilities ``(n, K)`` with labels as class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from driftloop.core.declarations import METRICS

EPS = 1e-15


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log-likelihood (binary: ``p`` = P(1); multiclass: ``p`` rows over classes)."""
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    y = np.asarray(y)
    if p.ndim == 1:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(np.int64)])))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); NaN when only one class is present."""
    y = np.asarray(y) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = pd.Series(np.asarray(p, np.float64)).rank(method="average").to_numpy()
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Share of rows whose predicted class (binary: P ≥ 0.5; multiclass: argmax) is the label."""
    p = np.asarray(p)
    pred = p.argmax(axis=1) if p.ndim == 2 else (p >= 0.5)
    return float(np.mean(pred.astype(np.int64) == np.asarray(y).astype(np.int64)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2))


def rmse(y: np.ndarray, v: np.ndarray) -> float:
    return float(np.sqrt(brier(y, v)))


def mae(y: np.ndarray, v: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(v, np.float64) - np.asarray(y, np.float64))))


def r2(y: np.ndarray, v: np.ndarray) -> float:
    """Coefficient of determination; NaN when the labels are constant."""
    y = np.asarray(y, np.float64)
    total = float(np.sum((y - y.mean()) ** 2))
    return math.nan if total == 0 else 1.0 - float(np.sum((y - np.asarray(v, np.float64)) ** 2)) / total


FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "log_loss": log_loss, "auc": auc, "accuracy": accuracy, "brier": brier, "rmse": rmse, "mae": mae, "r2": r2}
assert set(FUNCTIONS) == set(METRICS), "a declared metric has no function"


def evaluate(task: str, y: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """Every metric that fits ``task``: ``{metric: value}`` (NaN where undefined, e.g. AUC of one class)."""
    return {name: FUNCTIONS[name](y, out) for name, (tasks, _) in METRICS.items() if task in tasks}


def better(challenger: float, champion: float, higher_is_better: bool, margin: float) -> bool:
    """Whether ``challenger`` beats ``champion`` by more than ``margin`` (never when either is NaN)."""
    if not (math.isfinite(challenger) and math.isfinite(champion)):
        return False
    return challenger > champion + margin if higher_is_better else challenger < champion - margin
