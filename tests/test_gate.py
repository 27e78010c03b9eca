"""The promotion gate (retrain/gate.py) on synthetic holdouts: each check fails when it should, with its
reason, every failure is reported, and the measured values equal sklearn's or a pandas formula's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics as skm
from scipy.special import expit, logit

from driftloop.core.declarations import LabelSpec, ModelSpec
from driftloop.retrain.gate import GateResult, run_gate
from driftloop.retrain.shadow import ShadowResult

N = 3000


def make_spec(**kw: object) -> ModelSpec:
    base = dict(name="g", task="binary", metric="log_loss", higher_is_better=False, topic="events.g", key="k",
                feature_service="g_v1", features=["seg", "x"], label=LabelSpec(kind="field", topic="g.labels",
                                                                                id_field="eid"),
                gate_margin=0.001, slices=["seg"], slice_tolerance=0.05, slice_min_rows=50,
                calibration_tolerance=0.05, shadow_min_rows=200)
    return ModelSpec(**(base | kw))


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray | pd.DataFrame]:
    """A binary holdout: ``seg`` (3 values, 10 % in seg 2), ``x`` continuous; the true probabilities
    ``p`` and a champion whose logits carry noise (worse than ``p``, over-confident)."""
    rng = np.random.default_rng(0)
    seg = rng.choice(3, N, p=[0.45, 0.45, 0.10])
    x = rng.normal(size=N)
    p = expit(1.5 * x + 0.5 * (seg - 1))
    y = (rng.random(N) < p).astype(float)
    champ = expit(logit(p) + rng.normal(0, 0.8, N))
    hold = pd.DataFrame({"seg": seg.astype(float), "x": x, "label": y}, index=np.arange(N) + 10_000)  # any index
    return {"hold": hold, "y": y, "p": p, "champ": champ, "seg": seg, "x": x}


def ece(p: np.ndarray, y: np.ndarray) -> float:
    """Expected calibration error over 10 equal-width bins, with pandas."""
    df = pd.DataFrame({"p": p, "y": y, "bin": pd.cut(p, np.linspace(0, 1 + 1e-12, 11), right=False)})
    g = df.groupby("bin", observed=True).agg(n=("p", "size"), p=("p", "mean"), y=("y", "mean"))
    return float((g["n"] * (g["p"] - g["y"]).abs()).sum() / len(df))


def test_better_passes_with_measured_values(data):
    d = data
    res = run_gate(make_spec(), d["hold"], d["p"], d["champ"], champion_version="1")
    assert res.passed and res.failed == {} and res.summary() == "passed"
    y, p, c, seg = d["y"], d["p"], d["champ"], d["seg"]
    assert res.metrics["holdout_log_loss"] == pytest.approx(skm.log_loss(y, p))
    assert res.metrics["champion_holdout_log_loss"] == pytest.approx(skm.log_loss(y, c))
    assert res.metrics["holdout_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert res.metrics["holdout_brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert res.metrics["calibration_error"] == pytest.approx(ece(p, y))
    assert res.metrics["champion_calibration_error"] == pytest.approx(ece(c, y))
    for s in range(3):
        k = seg == s
        assert res.metrics[f"slice.seg.{s}.log_loss"] == pytest.approx(skm.log_loss(y[k], p[k]))
        assert res.metrics[f"champion_slice.seg.{s}.log_loss"] == pytest.approx(skm.log_loss(y[k], c[k]))


def test_worse_overall_fails_the_metric(data):
    d = data
    res = run_gate(make_spec(), d["hold"], d["champ"], d["p"], champion_version="7")
    assert not res.passed
    assert "does not beat champion v7" in res.failed["metric"]
    assert f"{skm.log_loss(d['y'], d['champ']):.4f}" in res.failed["metric"]


def test_better_overall_but_worse_on_a_slice_fails_that_slice(data):
    d = data
    y, p, c, m2 = d["y"], d["p"], d["champ"], d["seg"] == 2
    chal = p.copy()
    chal[m2] = expit(-0.3 * logit(p[m2]))  # wrong way round on seg 2 only
    assert skm.log_loss(y, chal) < skm.log_loss(y, c) - 0.01  # better overall ...
    mine, theirs = skm.log_loss(y[m2], chal[m2]), skm.log_loss(y[m2], c[m2])
    assert mine > theirs * 1.2  # ... but > 20 % worse on seg 2
    res = run_gate(make_spec(), d["hold"], chal, c, champion_version="1")
    assert set(res.failed) == {"slice:seg=2"}
    assert f"{mine:.4f} vs champion v1 {theirs:.4f} on {int(m2.sum())} rows" in res.failed["slice:seg=2"]
    assert res.metrics["slice.seg.2.log_loss"] == pytest.approx(mine)
    # the same slice within a looser tolerance passes
    assert run_gate(make_spec(slice_tolerance=0.5), d["hold"], chal, c, champion_version="1").passed


def test_a_continuous_column_is_cut_into_quartiles(data):
    d = data
    y, p, c, x = d["y"], d["p"], d["champ"], d["x"]
    q = np.quantile(x, [0, 0.25, 0.5, 0.75, 1])
    top = x > q[3]
    chal = p.copy()
    chal[top] = expit(0.2 * logit(p[top]))  # under-confident on the top quartile
    spec = make_spec(slices=["x"], calibration_tolerance=0.2)
    res = run_gate(spec, d["hold"], chal, c, champion_version="1")
    name = f"slice:x={q[3]:.6g} to {q[4]:.6g}"
    assert set(res.failed) == {name}, res.failed
    assert res.metrics[f"slice.x.{q[3]:.6g} to {q[4]:.6g}.log_loss"] == pytest.approx(skm.log_loss(y[top], chal[top]))
    first = (x <= q[1])
    assert res.metrics[f"slice.x.{q[0]:.6g} to {q[1]:.6g}.log_loss"] == pytest.approx(
        skm.log_loss(y[first], chal[first]))


def test_small_slices_and_undefined_slice_metrics_are_not_judged(data):
    d = data
    hold = d["hold"].copy()
    hold["tiny"] = np.where(np.arange(N) < 30, 1.0, 0.0)  # 30 rows < slice_min_rows
    chal = d["p"].copy()
    chal[:30] = 1 - chal[:30]  # terrible on the tiny slice
    res = run_gate(make_spec(slices=["tiny"], calibration_tolerance=0.5), hold, chal, d["champ"], champion_version="1")
    assert res.passed, res.failed
    assert "1 slices with fewer than 50 rows" in res.notes["slices"] and "slice.tiny.1.log_loss" not in res.metrics

    # AUC of a slice with one class is undefined: skipped, not failed
    hold["one"] = np.where(d["y"] == 1, 1.0, 0.0)
    res = run_gate(make_spec(metric="auc", higher_is_better=True, slices=["one"], calibration_tolerance=0.5),
                   hold, d["p"], d["champ"], champion_version="1")
    assert res.passed and not any(k.startswith("slice.one") for k in res.metrics)


def test_nan_outputs_fail_outputs_and_skip_the_metric_checks(data):
    d = data
    chal = d["p"].copy()
    chal[[3, 50, 70]] = np.nan
    res = run_gate(make_spec(), d["hold"], chal, d["champ"], champion_version="1")
    assert set(res.failed) == {"outputs"} and "3 non-finite values" in res.failed["outputs"]
    assert "holdout" in res.notes and "holdout_log_loss" not in res.metrics
    out_of_range = d["p"] * 1.5
    assert "outside [0, 1]" in run_gate(make_spec(), d["hold"], out_of_range, None).failed["outputs"]


def test_wrong_shape_fails_the_signature(data):
    d = data
    res = run_gate(make_spec(), d["hold"], np.column_stack([1 - d["p"], d["p"]]), d["champ"], champion_version="1")
    assert set(res.failed) == {"signature"} and f"({N}, 2), expected ({N},)" in res.failed["signature"]
    assert set(run_gate(make_spec(), d["hold"], d["p"][:-1], None).failed) == {"signature"}
    assert set(run_gate(make_spec(), d["hold"], np.array(["a"] * N, dtype=object), None).failed) == {"signature"}


def test_miscalibrated_fails_calibration(data):
    d = data
    y, p, c = d["y"], d["p"], d["champ"]
    spec = make_spec(metric="auc", higher_is_better=True, slices=[], calibration_tolerance=0.1)
    chal = p ** 2  # same ranking as p: the better AUC, but too low
    assert skm.roc_auc_score(y, chal) > skm.roc_auc_score(y, c) + 0.001 and ece(c, y) <= 0.1 < ece(chal, y)
    assert ece(chal, y) > ece(c, y) + 0.1  # beyond the champion's own error plus the tolerance too
    res = run_gate(spec, d["hold"], chal, c, champion_version="1")
    assert set(res.failed) == {"calibration"}
    assert res.metrics["calibration_error"] == pytest.approx(ece(chal, y))
    assert f"{ece(chal, y):.4f} above champion v1's {ece(c, y):.4f} + tolerance 0.1" in res.failed["calibration"]


def test_a_miscalibrated_champion_raises_the_bar_by_its_own_error(data):
    d = data
    y, p = d["y"], d["p"]
    spec = make_spec(slices=[], calibration_tolerance=0.05)
    a, b = p ** 1.5, p ** 3  # both above tolerance, b further off
    assert 0.05 < ece(a, y) and ece(b, y) > ece(a, y) + 0.05
    assert run_gate(spec, d["hold"], a, b, champion_version="1").passed
    res = run_gate(spec, d["hold"], b, a, champion_version="1")
    assert f"above champion v1's {ece(a, y):.4f} + tolerance 0.05" in res.failed["calibration"]


def test_multiclass_and_regression_calibration():
    rng = np.random.default_rng(1)
    n, k = 2000, 3
    logits = rng.normal(size=(n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in probs]).astype(float)
    hold = pd.DataFrame({"seg": 0.0, "x": 0.0, "label": y})
    spec = make_spec(task="multiclass", metric="accuracy", higher_is_better=True, classes=["a", "b", "c"],
                     slices=[], calibration_tolerance=0.05)
    sharp = np.exp(logits * 3) / np.exp(logits * 3).sum(axis=1, keepdims=True)  # over-confident, same argmax
    res = run_gate(spec, hold, sharp, None)
    top = pd.DataFrame({"conf": sharp.max(axis=1), "hit": (sharp.argmax(axis=1) == y).astype(float)})
    top["bin"] = pd.cut(top["conf"], np.linspace(0, 1 + 1e-12, 11), right=False)
    g = top.groupby("bin", observed=True).agg(n=("conf", "size"), c=("conf", "mean"), h=("hit", "mean"))
    want = float((g["n"] * (g["c"] - g["h"]).abs()).sum() / n)
    assert res.metrics["calibration_error"] == pytest.approx(want) and want > 0.05
    assert set(res.failed) == {"calibration"}
    assert res.metrics["holdout_accuracy"] == pytest.approx(skm.accuracy_score(y, sharp.argmax(axis=1)))
    bad = probs.copy()
    bad[:, 0] += 0.3
    assert "not probability distributions" in run_gate(spec, hold, bad, None).failed["outputs"]

    v = rng.normal(10, 2, n)
    hold = pd.DataFrame({"seg": 0.0, "x": 0.0, "label": v})
    spec = make_spec(task="regression", metric="rmse", slices=[], calibration_tolerance=0.05)
    pred = v + rng.normal(0, 0.5, n) + 0.3  # biased by 0.3 / 2 = 15 % of the spread
    res = run_gate(spec, hold, pred, None)
    bias = abs((pd.Series(pred) - pd.Series(v)).mean()) / pd.Series(v).std(ddof=0)
    assert res.metrics["calibration_error"] == pytest.approx(bias) and set(res.failed) == {"calibration"}
    assert res.metrics["holdout_rmse"] == pytest.approx(skm.root_mean_squared_error(v, pred))


def shadow(challenger: float, champion: float, se: float = 0.0, rows: int = 500, champion_version: str = "1",
           metric: str = "log_loss") -> ShadowResult:
    return ShadowResult(rows=rows, challenger=challenger, champion=champion, metric=metric, version="2",
                        champion_version=champion_version, difference_se=se)


def test_shadow_worse_fails(data):
    d = data

    def gate(sr: ShadowResult, **kw: object) -> GateResult:
        return run_gate(make_spec(**kw), d["hold"], d["p"], d["champ"], champion_version="1", shadow=sr)

    res = gate(shadow(0.62, 0.55, se=0.01))
    assert set(res.failed) == {"shadow"} and "worse by 0.0700" in res.failed["shadow"]
    assert res.metrics["shadow_log_loss"] == 0.62 and res.metrics["shadow_champion_log_loss"] == 0.55
    assert res.metrics["shadow_rows"] == 500
    assert gate(shadow(0.62, 0.55, se=0.05)).passed  # 0.07 < 0.001 + 1.645 * 0.05: within the noise
    assert "shadow" in gate(shadow(0.552, 0.55)).failed  # no uncertainty known: the margin alone
    assert gate(shadow(0.5505, 0.55)).passed and gate(shadow(0.50, 0.55)).passed
    auc = gate(shadow(0.70, 0.75, se=0.01, metric="auc"), metric="auc", higher_is_better=True)
    assert set(auc.failed) == {"shadow"} and "auc 0.7000 vs champion v1 0.7500" in auc.failed["shadow"]

    few = gate(shadow(0.9, 0.5, rows=199))
    assert few.passed and "199 labelled shadow events" in few.notes["shadow"] and few.metrics["shadow_rows"] == 199
    other = gate(shadow(0.9, 0.5, champion_version="0"))
    assert other.passed and "not the current champion v1" in other.notes["shadow"]
    assert "shadow" in gate(shadow(float("nan"), 0.5)).failed


def test_several_failures_are_all_reported(data):
    d = data
    y, p, c, m2 = d["y"], d["p"], d["champ"], d["seg"] == 2
    chal = c ** 2  # worse than the champion, miscalibrated ...
    chal[m2] = 1 - chal[m2]  # ... far worse on seg 2
    res = run_gate(make_spec(), d["hold"], chal, p, champion_version="3", shadow=shadow(0.9, 0.5, champion_version="3"))
    assert {"metric", "slice:seg=2", "calibration", "shadow"} <= set(res.failed), res.failed
    summary = res.summary()
    assert summary.startswith("failed: ") and all(f"{k}: {v}" in summary for k, v in res.failed.items())
    assert res.metrics["calibration_error"] == pytest.approx(ece(chal, y))


def test_rollback_checks_only_signature_and_outputs(data):
    d = data
    worse = d["champ"] ** 2
    res = run_gate(make_spec(), d["hold"], worse, d["p"], champion_version="1", shadow=shadow(0.9, 0.5),
                   metric_gate=False)
    assert res.passed and res.metrics == {}
    nan = d["p"].copy()
    nan[0] = np.nan
    assert set(run_gate(make_spec(), d["hold"], nan, d["p"], metric_gate=False).failed) == {"outputs"}
    assert set(run_gate(make_spec(), d["hold"], d["p"][:10], None, metric_gate=False).failed) == {"signature"}


def test_without_a_usable_champion_any_finite_metric_passes(data):
    d = data
    spec = make_spec(calibration_tolerance=0.1)
    res = run_gate(spec, d["hold"], d["champ"], None)
    assert res.passed and "no champion" in res.notes["slices"] and "slice.seg.0.log_loss" in res.metrics
    broken = d["p"].copy()
    broken[5] = np.inf
    res = run_gate(spec, d["hold"], d["champ"], broken, champion_version="4")
    assert res.passed and "champion v4 outputs unusable" in res.notes["champion"]
    one_class = d["hold"].assign(label=0.0)
    res = run_gate(make_spec(metric="auc", higher_is_better=True, slices=[], calibration_tolerance=1.0), one_class,
                   d["p"], None)
    assert res.failed == {"metric": "holdout auc is nan"}
