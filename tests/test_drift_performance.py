"""Label-free performance estimates against realised metrics on simulated calibrated scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from scipy.special import expit

from driftloop.drift.performance import calibration, dropped, estimate, expected_auc, outputs, realised


def calibrated(rng: np.random.Generator, n: int, mean: float = 0.0, sd: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a calibrated model on inputs x ~ N(mean, sd) and labels drawn as Bernoulli(score)."""
    p = expit(-1.0 + 1.5 * rng.normal(mean, sd, n))
    return p, (rng.random(n) < p).astype(np.int64)


def mann_whitney_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float(sps.mannwhitneyu(pos, neg).statistic / (pos.size * neg.size))


def test_expected_auc_is_the_pairwise_expectation() -> None:
    """The sort-based sums equal the brute-force double sums over pairs i ≠ j (ties counted half)."""
    rng = np.random.default_rng(3)
    p = np.round(rng.beta(2, 3, 400), 2)  # many ties
    h = (p[:, None] > p[None, :]) + 0.5 * (p[:, None] == p[None, :])
    w = p[:, None] * (1 - p[None, :])
    np.fill_diagonal(w, 0.0)
    assert expected_auc(p) == pytest.approx(float((w * h).sum() / w.sum()), rel=1e-12)


def test_expected_auc_matches_monte_carlo() -> None:
    rng = np.random.default_rng(4)
    p, _ = calibrated(rng, 1000)
    draws = [mann_whitney_auc((rng.random(p.size) < p).astype(int), p) for _ in range(300)]
    assert estimate("binary", "auc", p) == pytest.approx(float(np.mean(draws)), abs=0.003)


@pytest.mark.parametrize(("mean", "sd"), [(0.0, 1.0), (1.0, 1.0), (-0.5, 0.4), (0.0, 2.0)])
def test_binary_estimates_follow_covariate_shift(mean: float, sd: float) -> None:
    """Inputs move (the scores with them) but P(y | x) does not: the estimate tracks the realised metric."""
    rng = np.random.default_rng(int(10 * mean + 100 * sd))
    p, y = calibrated(rng, 20_000, mean, sd)
    assert realised("binary", "auc", y, p) == pytest.approx(mann_whitney_auc(y, p), rel=1e-12)
    want_ll = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert realised("binary", "log_loss", y, p) == pytest.approx(want_ll, rel=1e-9)
    assert estimate("binary", "auc", p) == pytest.approx(mann_whitney_auc(y, p), abs=0.02)
    assert estimate("binary", "log_loss", p) == pytest.approx(want_ll, rel=0.05)
    assert estimate("binary", "accuracy", p) == pytest.approx(float(np.mean((p >= 0.5) == y)), abs=0.02)
    assert estimate("binary", "brier", p) == pytest.approx(float(np.mean((p - y) ** 2)), rel=0.05)


def test_estimate_moves_with_the_shift() -> None:
    """Narrower inputs separate worse: the estimated AUC drops as the realised one does."""
    rng = np.random.default_rng(5)
    wide, narrow = calibrated(rng, 20_000, 0.0, 1.0), calibrated(rng, 20_000, 0.0, 0.4)
    est = [estimate("binary", "auc", p) for p, _ in (wide, narrow)]
    real = [mann_whitney_auc(y, p) for p, y in (wide, narrow)]
    assert est[0] - est[1] > 0.1 and abs((est[0] - est[1]) - (real[0] - real[1])) < 0.03


def test_multiclass_estimates() -> None:
    rng = np.random.default_rng(6)
    probs = rng.dirichlet([2.0, 1.0, 0.5], 20_000)
    y = (rng.random(len(probs))[:, None] > probs.cumsum(axis=1)[:, :-1]).sum(axis=1)  # a class drawn from each row
    acc = float(np.mean(probs.argmax(axis=1) == y))
    ll = float(-np.mean(np.log(probs[np.arange(len(y)), y])))
    assert estimate("multiclass", "accuracy", probs.argmax(axis=1), probs) == pytest.approx(acc, abs=0.02)
    assert estimate("multiclass", "log_loss", None, probs) == pytest.approx(ll, rel=0.05)  # type: ignore[arg-type]
    assert realised("multiclass", "accuracy", y, probs) == pytest.approx(acc)
    frame = pd.DataFrame(probs, columns=["p0", "p1", "p2"]).assign(score=probs.argmax(axis=1).astype(float))
    scores, got = outputs(frame, "multiclass")
    assert got is not None and np.array_equal(got, probs) and np.array_equal(scores, probs.argmax(axis=1))
    assert outputs(frame, "binary")[1] is None


def test_estimate_edges() -> None:
    assert estimate("regression", "rmse", np.ones(3)) is None
    assert math.isnan(estimate("binary", "auc", np.array([])))  # type: ignore[arg-type]
    assert math.isnan(estimate("binary", "auc", np.zeros(5)))  # type: ignore[arg-type]  # no positives expected
    with pytest.raises(ValueError, match="metric 'auc' does not fit a multiclass model"):
        estimate("multiclass", "auc", np.ones(3))
    with pytest.raises(ValueError, match="needs the class probabilities"):
        estimate("multiclass", "accuracy", np.ones(3))
    with pytest.raises(ValueError, match="does not fit a binary model"):
        realised("binary", "rmse", np.ones(3), np.ones(3))


def test_dropped() -> None:
    assert dropped(0.70, 0.80, True, 0.1)  # AUC down 12.5 %
    assert not dropped(0.75, 0.80, True, 0.1)  # down 6.25 %
    assert not dropped(0.90, 0.80, True, 0.1)  # better
    assert dropped(0.45, 0.40, False, 0.1)  # log loss up 12.5 %
    assert not dropped(0.35, 0.40, False, 0.1)
    assert dropped(-0.2, 0.0, True, 0.1) and not dropped(-0.05, 0.0, True, 0.1)  # zero reference: absolute
    assert dropped(-0.5, -0.2, True, 0.1)  # r2 below a negative reference, relative to its size
    assert not dropped(math.nan, 0.8, True, 0.1) and not dropped(0.5, math.inf, True, 0.1)


def test_calibration_on_reference_labels_corrects_a_miscalibrated_model():
    """An overconfident model: its raw scores underestimate its log loss; calibrated on a labelled reference
    (CBPE's first step), the estimate on a new window lands near the realised log loss."""
    rng = np.random.default_rng(21)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        z = rng.normal(size=n)
        truth = 1 / (1 + np.exp(-z))  # P(y = 1)
        score = 1 / (1 + np.exp(-2.5 * z))  # the model is overconfident
        return score, (rng.random(n) < truth).astype(float)

    ref_s, ref_y = sample(5000)
    s, y = sample(20000)
    pc = np.clip(s, 1e-15, 1 - 1e-15)
    real = float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))  # computed here, not by the code under test
    raw = estimate("binary", "log_loss", s)
    cal = calibration(ref_s, ref_y)
    assert cal is not None and calibration(ref_s[:60], ref_y[:60]) is None
    fixed = estimate("binary", "log_loss", s, calibrated=cal(s))
    assert abs(raw - real) / real > 0.2 and abs(fixed - real) / real < 0.05, (raw, fixed, real)
    acc = float(np.mean((s >= 0.5) == (y == 1)))
    assert abs(estimate("binary", "accuracy", s, calibrated=cal(s)) - acc) < 0.02
    auc = sps.mannwhitneyu(s[y == 1], s[y == 0]).statistic / ((y == 1).sum() * (y == 0).sum())
    assert abs(estimate("binary", "auc", s, calibrated=cal(s)) - auc) < 0.02
