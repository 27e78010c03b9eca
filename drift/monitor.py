"""The drift monitor: per declared model, windows of its champion's predictions vs that version's reference.

One consumer reads ``predictions`` and routes each record by ``model_name`` to that model's state
(records of models that are not declared are skipped). Each full window (the model's ``drift_window``
predictions of one version) runs Evidently's ``DataDriftPreset`` over the model's features and its
score, publishes ``drift.reports``, and when the drifted-column share reaches the model's
``drift_share_threshold`` in ``drift_persist_windows`` consecutive windows (and no request for that
model was sent within its ``retrain_cooldown_s``) publishes a ``retrain.requests`` record for that model
with ``since_ts`` = the start of the first drifted window, so the retrain job learns from the drifted
regime; a single noisy window does not trigger a retrain. Offsets are committed after a window's
outputs are acked. The alert webhook's threads share the producer: every report and request tracks its
own acks (``Deliveries``), so one thread's failure is never reported to, nor hidden by, another. The
worker restarts (``RESTART_EXIT``) when new declarations are applied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
from pydantic import ValidationError

from driftloop.core.contracts import DriftReport, Prediction, RetrainRequest
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.kafka import Deliveries, good_messages, make_consumer, make_producer
from driftloop.core.metrics import DRIFT_SHARE, RETRAIN_REQUESTS
from driftloop.core.settings import Settings
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.drift.webhook import UnknownModel, start_webhook
from driftloop.features.repo import declarations
from driftloop.registry.versions import load_reference

log = logging.getLogger(__name__)


def drift_scores(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str],
                 threshold: float = 0.5) -> tuple[float, dict]:
    """Evidently drift per column: (drifted share, {column: {score, threshold, drifted}}), over the
    ``columns`` present in both frames that vary in the reference."""
    cols = [c for c in columns if c in reference and c in current and reference[c].nunique() > 1]
    if not cols:
        return 0.0, {}
    snap = Report([DataDriftPreset(columns=cols, drift_share=threshold)]).run(
        current_data=current[cols], reference_data=reference[cols])
    per_col: dict[str, dict[str, Any]] = {}
    share = 0.0
    for m in snap.dict()["metrics"]:
        cfg = m["config"]
        if cfg["type"].endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
        elif cfg["type"].endswith("ValueDrift"):
            value, thr = float(m["value"]), float(cfg["threshold"])
            lower_is_drift = "p_value" in cfg["method"]
            drifted = value < thr if lower_is_drift else value >= thr
            per_col[cfg["column"]] = {"score": value, "threshold": thr, "drifted": drifted}
    return share, per_col


@dataclass
class ModelState:
    """One model's drift state: the open window, the run of drifted windows, the last request."""

    spec: ModelSpec
    window: list[Prediction] = field(default_factory=list)
    run_windows: int = 0  # consecutive drifted windows so far, and when the first of them started
    run_start_ts: int | None = None
    last_request_s: float = float("-inf")

    @property
    def columns(self) -> list[str]:
        return [*self.spec.features, "score"]


class Monitor:
    def __init__(self, settings: Settings, decls: Declarations | None = None):
        self.s = settings
        self.decls = decls or declarations(settings)
        self.producer = make_producer(settings)  # shared by the main loop and the webhook's threads
        self.states = {name: ModelState(spec) for name, spec in self.decls.models.items()}
        self.refs: dict[tuple[str, str], pd.DataFrame] = {}
        self.skipped: set[str] = set()  # undeclared models already logged

    def reference(self, name: str, version: str) -> pd.DataFrame:
        if (name, version) not in self.refs:
            self.refs[(name, version)] = load_reference(self.s, name, version)
        return self.refs[(name, version)]

    def pending(self) -> bool:
        """Whether some model holds predictions of an unfinished window."""
        return any(st.window for st in self.states.values())

    def add(self, p: Prediction) -> DriftReport | None:
        """Route one prediction to its model's window; the report when that window is full."""
        st = self.states.get(p.model_name)
        if st is None:
            if p.model_name not in self.skipped:
                self.skipped.add(p.model_name)
                log.info("skipping predictions of %r: not a declared model (declared: %s)", p.model_name,
                         sorted(self.states))
            return None
        if st.window and p.model_version != st.window[0].model_version:
            st.window, st.run_windows = [], 0  # a new version has its own reference
        st.window.append(p)
        if len(st.window) < st.spec.drift_window:
            return None
        win, st.window = st.window, []
        return self.evaluate(st, win)

    def evaluate(self, st: ModelState, win: list[Prediction]) -> DriftReport | None:
        spec, version = st.spec, win[0].model_version
        try:
            ref = self.reference(spec.name, version)
        except Exception as e:  # a version without a readable reference sample cannot be compared
            log.warning("%s v%s: no reference sample (%s); window of %d dropped", spec.name, version, e, len(win))
            return None
        cur = pd.DataFrame([{**p.features, "score": p.score} for p in win])
        share, cols = drift_scores(ref, cur, st.columns, spec.drift_share_threshold)
        drifted = share >= spec.drift_share_threshold
        rep = DriftReport(model_name=spec.name, model_version=version, window_start_ts=win[0].ts,
                          window_end_ts=win[-1].ts, rows=len(win), drift_share=share, drifted=drifted,
                          columns=cols)
        DRIFT_SHARE.labels(model=spec.name).set(share)
        out = Deliveries(self.producer)
        out.event(self.s, "drift.reports", rep, spec.name)
        log.info("%s window v%s: drift share %.2f%s", spec.name, version, share, " DRIFT" if drifted else "")
        st.run_windows = st.run_windows + 1 if drifted else 0
        if st.run_windows == 1:
            st.run_start_ts = rep.window_start_ts
        if st.run_windows >= spec.drift_persist_windows and \
                time.monotonic() - st.last_request_s >= spec.retrain_cooldown_s:
            self.request(spec.name, "drift", {
                "report_id": rep.event_id, "drift_share": share, "windows": st.run_windows,
                "drifted_columns": [c for c, v in cols.items() if v["drifted"]]}, since_ts=st.run_start_ts)
        out.wait()
        return rep

    def request(self, name: str, reason: str, evidence: dict[str, Any], since_ts: int | None = None) -> str:
        """Publish a retrain request for model ``name`` and wait for its ack; returns its id (DeliveryError
        when the broker did not acknowledge it)."""
        req = RetrainRequest(model_name=name, reason=reason, evidence=evidence,  # type: ignore[arg-type]
                             since_ts=since_ts)
        out = Deliveries(self.producer)
        out.event(self.s, "retrain.requests", req, name)
        out.wait()
        RETRAIN_REQUESTS.labels(model=name, reason=reason).inc()
        self.states[name].last_request_s = time.monotonic()
        log.info("%s: retrain request %s (%s)", name, req.request_id, reason)
        return req.request_id

    def on_alert(self, alert: dict[str, Any]) -> str:
        """A webhook alert → a ``webhook`` retrain request of its model (cooldown does not apply to explicit
        alerts). Raises ValueError for a malformed alert, UnknownModel for an undeclared model."""
        name = alert.get("model_name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"the alert needs model_name, one of: {', '.join(sorted(self.states)) or 'none'}")
        if name not in self.states:
            raise UnknownModel(name, sorted(self.states))
        since = alert.get("since_ts")
        if since is not None and (not isinstance(since, int) or isinstance(since, bool)):
            raise ValueError("since_ts must be epoch microseconds (int)")
        return self.request(name, "webhook", {"alert": alert}, since_ts=since)


def run(settings: Settings) -> None:
    stop = StopFlag()
    watch = DeclarationsWatch(settings)
    mon = Monitor(settings)
    log.info("monitoring models %s", sorted(mon.states) or "none (nothing declared)")
    server = start_webhook(settings.webhook_port, mon.on_alert)
    consumer = make_consumer(settings, f"{settings.topic_prefix}drift", ["predictions"])
    mark_ready(settings, "drift")
    restart = False
    try:
        while not stop and not restart:
            msgs = good_messages(consumer.consume(1000, 0.5))
            reported = False
            for msg in msgs:
                try:
                    p = Prediction.from_bytes(msg.value())
                except (ValidationError, ValueError):
                    continue
                reported = mon.add(p) is not None or reported
            if reported or (msgs and not mon.pending()):
                consumer.commit(asynchronous=False)
            restart = watch.changed()  # open windows are not committed: the restarted worker re-reads them
    finally:
        consumer.close()
        server.shutdown()
    if restart:
        raise SystemExit(RESTART_EXIT)
