"""The promotion gate: a challenger's outputs against the champion's on the same labelled holdout.

Checks (every one is evaluated; :class:`GateResult` lists each failure with a one-line reason):

* ``signature``: outputs of shape ``(n,)`` (binary, regression) or ``(n, classes)`` (multiclass). When it
  fails, nothing else about the outputs can be judged.
* ``outputs``: finite values, binary scores in [0, 1], multiclass rows that are distributions
  (``registry.verify.check_outputs``). When it fails, the metric-based checks below are not evaluated
  (the metrics of invalid outputs are undefined or meaningless, e.g. log-loss clips scores above 1).
* ``metric``: the challenger beats the champion on the primary metric by ``gate_margin``
  (``model_metrics.better``); with no champion any finite value passes.
* ``slice:<col>=<value>``: per column of ``spec.slices``, its distinct values (at most 20) or else its
  quartile bins, labelled ``"<lo> to <hi>"`` (``lo < x <= hi``; the first bin includes ``lo``); rows with
  no value form the slice ``missing``. A slice with at least ``slice_min_rows`` rows fails when the
  challenger's metric there is worse than the champion's by more than ``slice_tolerance`` relative to the
  champion's value. Slices where either metric is undefined (e.g. AUC of one class) are skipped.
* ``calibration``: binary: expected calibration error (ECE) over 10 equal-width score bins; multiclass:
  the ECE of the top class (confidence vs accuracy); regression: ``|mean(pred - y)| / std(y)``. Fails
  above ``calibration_tolerance``, or, with a champion, above the champion's own error plus that
  tolerance when that is higher: after a drift the serving model is itself off, and a retrain that
  beats it on the primary metric (a proper score for classifiers) must not be blocked by a bar the
  champion does not meet, only kept from being much worse calibrated.
* ``shadow``: live results from serving's shadow scoring (``retrain/shadow.py``), when they cover at
  least ``shadow_min_rows`` labelled events scored by both models. With ``d`` = how much worse the
  challenger's live metric is than the champion's on those same events (positive = worse, in the
  metric's direction) and ``se`` the bootstrap standard error of that paired difference, it fails when
  ``d > gate_margin + 1.645 * se``: the challenger is worse than the margin allows with one-sided 95 %
  confidence. The holdout already demands that the challenger be *better*; the live check guards
  against a regression the holdout cannot show (features computed differently online, leakage in the
  offline set), so it rejects on evidence of harm, not on the noise of a few hundred paired events.
  Results against a champion other than the current one are not used.

With ``metric_gate=False`` (rollback) only ``signature`` and ``outputs`` are checked.

Metric names are MLflow-safe: ``holdout_<metric>``, ``champion_holdout_<metric>``, ``calibration_error``,
``champion_calibration_error``, ``slice.<col>.<value>.<metric>`` (and ``champion_slice...``),
``shadow_<metric>``, ``shadow_champion_<metric>``, ``shadow_rows``, ``shadow_difference_se``; non-finite
values are left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from driftloop.core import model_metrics as m
from driftloop.core.declarations import ModelSpec
from driftloop.registry.verify import ModelCheckError, check_outputs

if TYPE_CHECKING:
    from driftloop.retrain.shadow import ShadowResult

MAX_DISTINCT = 20  # a slice column with more distinct values is cut into quartile bins
CALIBRATION_BINS = 10
SHADOW_Z = 1.645  # one-sided 95 %
MISSING = "missing"
_UNSAFE = re.compile(r"[^\w.\- ]")  # MLflow metric names: alphanumerics, _ . - space (and / :, avoided)


@dataclass
class GateResult:
    """The gate's decision: every failed check with its reason, what was measured, and why some checks
    were not evaluated (``notes``)."""

    passed: bool
    failed: dict[str, str]
    metrics: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``passed`` or ``failed: check: reason; ...``."""
        if self.passed:
            return "passed"
        return "failed: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items())


def calibration_error(task: str, y: np.ndarray, out: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Binary: ECE of P(positive) over ``bins`` equal-width bins; multiclass: ECE of the top class;
    regression: ``|mean(pred - y)| / std(y)`` (0 for unbiased predictions of a constant label, else inf)."""
    y = np.asarray(y, np.float64)
    out = np.asarray(out, np.float64)
    if task == "regression":
        bias, spread = abs(float(np.mean(out - y))), float(np.std(y))
        return bias / spread if spread > 0 else (0.0 if bias == 0 else math.inf)
    if task == "multiclass":
        conf, hit = out.max(axis=1), (out.argmax(axis=1) == y).astype(np.float64)
    else:
        conf, hit = out, y
    if len(y) == 0:
        return math.nan
    idx = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    gap = np.abs(np.bincount(idx, conf, bins) - np.bincount(idx, hit, bins))  # per bin: n * |mean conf - mean hit|
    return float(gap.sum() / len(y))


def slices(values: pd.Series) -> list[tuple[str, np.ndarray]]:
    """(label, row mask) per slice of a column: its distinct values when there are at most 20, else its
    quartile bins ``"<lo> to <hi>"``; rows without a value form ``missing``."""
    v = values.reset_index(drop=True)
    missing = v.isna().to_numpy()
    present = v[~missing]
    distinct = pd.unique(present)
    out: list[tuple[str, np.ndarray]] = []
    if len(distinct) <= MAX_DISTINCT:
        try:
            distinct = np.sort(distinct)
        except TypeError:  # mixed types: keep first-seen order
            pass
        out = [(_label(d), (v == d).to_numpy() & ~missing) for d in distinct]
    else:
        x = pd.to_numeric(v, errors="coerce").to_numpy(np.float64)
        missing = missing | np.isnan(x)  # (a numeric feature has no other values)
        edges = np.unique(np.quantile(x[~missing], [0.0, 0.25, 0.5, 0.75, 1.0])) if (~missing).any() else []
        idx = np.searchsorted(edges[1:-1], x, side="left")  # inner edges strictly below x: lo < x <= hi
        out = [(f"{_label(edges[i])} to {_label(edges[i + 1])}", (idx == i) & ~missing)
               for i in range(len(edges) - 1)]
    if missing.any():
        out.append((MISSING, missing))
    return out


def _label(value: object) -> str:
    if isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
        return f"{float(value):.6g}"
    return str(value)


def _metric_key(col: str, label: str, metric: str) -> str:
    return f"slice.{col}.{_UNSAFE.sub('_', label)}.{metric}"


def metric_failure(spec: ModelSpec, mine: float, theirs: float, champion: str | None, has_champion: bool) -> str | None:
    """Why the challenger's holdout metric ``mine`` fails against the champion's ``theirs``; None when it
    passes (with no champion, any finite value passes)."""
    if not has_champion:
        return None if math.isfinite(mine) else f"holdout {spec.metric} is {mine}"
    if m.better(mine, theirs, spec.higher_is_better, spec.gate_margin):
        return None
    return (f"holdout {spec.metric} {mine:.4f} does not beat {_who(champion)} {theirs:.4f} by {spec.gate_margin} "
            f"({'higher' if spec.higher_is_better else 'lower'} is better)")


def _who(champion: str | None) -> str:
    return f"champion v{champion}" if champion is not None else "the champion"


def _worse(mine: float, theirs: float, higher_is_better: bool) -> float:
    """How much worse ``mine`` is than ``theirs`` in the metric's direction (negative: better)."""
    return theirs - mine if higher_is_better else mine - theirs


def _shape_failure(out: np.ndarray | None, want: tuple[int, ...]) -> str | None:
    if out is None:
        return "no outputs"
    return None if out.shape == want else f"output shape {out.shape}, expected {want}"


def _as_array(out: object) -> np.ndarray | None:
    try:
        return np.asarray(out, np.float64)
    except (TypeError, ValueError):
        return None


def run_gate(spec: ModelSpec, holdout: pd.DataFrame, challenger: np.ndarray, champion: np.ndarray | None, *,
             champion_version: str | None = None, shadow: ShadowResult | None = None,
             metric_gate: bool = True) -> GateResult:
    """Gate ``challenger`` (outputs on ``holdout``'s feature matrix) against ``champion`` (its outputs on the
    same rows; None when there is none or it cannot score them). ``holdout`` holds ``spec.features`` and
    ``label``, one row per output row."""
    failed: dict[str, str] = {}
    metrics: dict[str, float] = {}
    notes: dict[str, str] = {}
    n = len(holdout)
    want = (n,) if spec.n_outputs == 1 else (n, spec.n_outputs)
    out = _as_array(challenger)
    bad_shape = _shape_failure(out, want)
    if bad_shape:
        failed["signature"] = f"challenger: {bad_shape}"
    else:
        try:
            check_outputs(out, n, spec.task, spec.n_outputs, "challenger")
        except ModelCheckError as e:
            failed["outputs"] = str(e)
    if not metric_gate:
        return GateResult(not failed, failed, metrics, notes)

    champ = None if champion is None else _as_array(champion)
    if champion is not None:
        try:
            if (why := _shape_failure(champ, want)) is not None:
                raise ModelCheckError("signature", why)
            check_outputs(champ, n, spec.task, spec.n_outputs, _who(champion_version))
        except ModelCheckError as e:
            notes["champion"] = f"{_who(champion_version)} outputs unusable, gated against nothing: {e}"
            champ = None
    if failed:
        notes["holdout"] = "metric, slices and calibration not evaluated: the challenger's outputs are invalid"
    else:
        assert out is not None
        _holdout_checks(spec, holdout, out, champ, champion_version, failed, metrics, notes)
    _shadow_check(spec, shadow, champion_version, failed, metrics, notes)
    return GateResult(not failed, failed, {k: float(v) for k, v in metrics.items() if math.isfinite(v)}, notes)


def _holdout_checks(spec: ModelSpec, holdout: pd.DataFrame, out: np.ndarray, champ: np.ndarray | None,
                    champion_version: str | None, failed: dict[str, str], metrics: dict[str, float],
                    notes: dict[str, str]) -> None:
    """The metric, slice and calibration checks on valid challenger outputs."""
    y = holdout["label"].to_numpy(np.float64)
    f, who = m.FUNCTIONS[spec.metric], _who(champion_version)
    metrics |= {f"holdout_{k}": v for k, v in m.evaluate(spec.task, y, out).items()}
    if champ is not None:
        metrics |= {f"champion_holdout_{k}": v for k, v in m.evaluate(spec.task, y, champ).items()}
    mine = metrics[f"holdout_{spec.metric}"]
    theirs = metrics.get(f"champion_holdout_{spec.metric}", math.nan)
    if (why := metric_failure(spec, mine, theirs, champion_version, champ is not None)) is not None:
        failed["metric"] = why

    small = 0
    for col in spec.slices:
        if col not in holdout.columns:
            failed[f"slice:{col}"] = f"declared slice column {col!r} is not in the holdout"
            continue
        for label, mask in slices(holdout[col]):
            rows = int(mask.sum())
            if rows < spec.slice_min_rows:
                small += 1
                continue
            a = f(y[mask], out[mask])
            metrics[_metric_key(col, label, spec.metric)] = a
            if champ is None:
                continue
            b = f(y[mask], champ[mask])
            metrics["champion_" + _metric_key(col, label, spec.metric)] = b
            if not (math.isfinite(a) and math.isfinite(b)):
                continue
            rel = _worse(a, b, spec.higher_is_better) / max(abs(b), m.EPS)
            if rel > spec.slice_tolerance:
                failed[f"slice:{col}={label}"] = (
                    f"{spec.metric} {a:.4f} vs {who} {b:.4f} on {rows} rows: {rel:.1%} worse "
                    f"(tolerance {spec.slice_tolerance:.1%})")
    why = [f"{small} slices with fewer than {spec.slice_min_rows} rows not judged"] if small else []
    if spec.slices and champ is None:
        why.append("no champion to compare the slices with")
    if why:
        notes["slices"] = "; ".join(why)

    cal = metrics["calibration_error"] = calibration_error(spec.task, y, out)
    tol = spec.calibration_tolerance
    theirs_cal = math.nan
    if champ is not None:
        theirs_cal = metrics["champion_calibration_error"] = calibration_error(spec.task, y, champ)
    limit = max(tol, theirs_cal + tol) if math.isfinite(theirs_cal) else tol
    if not cal <= limit:  # NaN fails too
        if limit > tol:
            failed["calibration"] = (f"calibration error {cal:.4f} above {who}'s {theirs_cal:.4f} + tolerance {tol}")
        else:
            failed["calibration"] = f"calibration error {cal:.4f} above tolerance {tol}"


def _shadow_check(spec: ModelSpec, shadow: ShadowResult | None, champion_version: str | None,
                  failed: dict[str, str], metrics: dict[str, float], notes: dict[str, str]) -> None:
    """The live check on serving's shadow results (rule in the module docstring)."""
    if shadow is None:
        return
    metrics["shadow_rows"] = float(shadow.rows)
    if shadow.rows < spec.shadow_min_rows:
        notes["shadow"] = f"{shadow.rows} labelled shadow events < shadow_min_rows {spec.shadow_min_rows}"
        return
    if shadow.metric != spec.metric:
        notes["shadow"] = f"shadow results measure {shadow.metric}, the model's metric is {spec.metric}"
        return
    if champion_version is not None and str(shadow.champion_version) != str(champion_version):
        notes["shadow"] = (f"shadow results compare with v{shadow.champion_version}, not the current champion "
                           f"v{champion_version}")
        return
    metrics[f"shadow_{spec.metric}"] = shadow.challenger
    metrics[f"shadow_champion_{spec.metric}"] = shadow.champion
    metrics["shadow_difference_se"] = shadow.difference_se
    mine, theirs = shadow.challenger, shadow.champion
    if not math.isfinite(theirs):
        notes["shadow"] = f"the champion's live {spec.metric} is undefined on these events"
        return
    where = f"on {shadow.rows} live events"
    if not math.isfinite(mine):
        failed["shadow"] = f"live {spec.metric} is {mine} {where} (champion v{shadow.champion_version} {theirs:.4f})"
        return
    se = shadow.difference_se if math.isfinite(shadow.difference_se) else 0.0
    worse = _worse(mine, theirs, spec.higher_is_better)
    allowed = spec.gate_margin + SHADOW_Z * se
    if worse > allowed:
        failed["shadow"] = (f"live {spec.metric} {mine:.4f} vs champion v{shadow.champion_version} {theirs:.4f} "
                            f"{where}: worse by {worse:.4f} > margin {spec.gate_margin} + {SHADOW_Z} x se {se:.4f}")
