"""The drift monitor: windows of the champion's predictions vs the champion's reference sample.

Each full window (``drift_window`` predictions of one model version) runs Evidently's
``DataDriftPreset`` over the model's features and its score, publishes ``drift.reports``, and when
the drifted-column share reaches ``drift_share_threshold`` in ``drift_persist_windows`` consecutive
windows (and no request was sent within ``drift_cooldown_s``) publishes a ``retrain.requests`` record
with ``since_ts`` = the start of the first drifted window, so the retrain job learns from the drifted
regime; a single noisy window does not trigger a retrain. Offsets are committed after a window's outputs are acked.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset
from pydantic import ValidationError

from driftloop.drift.webhook import start_webhook
from driftloop.features.vectors import FEATURE_COLUMNS
from driftloop.registry import models
from driftloop.core.contracts import DriftReport, Prediction, RetrainRequest
from driftloop.core.kafka import flush_or_raise, good_messages, make_consumer, make_producer, produce_event
from driftloop.core.metrics import DRIFT_SHARE, RETRAIN_REQUESTS
from driftloop.core.settings import Settings
from driftloop.core.worker import StopFlag, mark_ready

log = logging.getLogger(__name__)

COLUMNS = [*FEATURE_COLUMNS, "score"]


def drift_scores(reference: pd.DataFrame, current: pd.DataFrame, threshold: float = 0.5) -> tuple[float, dict]:
    """Evidently drift per column: (drifted share, {column: {p_value|distance, drifted}})."""
    cols = [c for c in COLUMNS if c in reference and c in current and reference[c].nunique() > 1]
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


class Monitor:
    def __init__(self, settings: Settings):
        self.s = settings
        self.producer = make_producer(settings)
        self.window: list[Prediction] = []
        self.refs: dict[str, pd.DataFrame] = {}
        self.last_request_s = 0.0
        self.run_windows = 0  # consecutive drifted windows so far, and when the first of them started
        self.run_start_ts: int | None = None

    def reference(self, version: str) -> pd.DataFrame:
        if version not in self.refs:
            self.refs[version] = models.load_reference(self.s, version)
        return self.refs[version]

    def add(self, p: Prediction) -> DriftReport | None:
        if self.window and p.model_version != self.window[0].model_version:
            self.window = []  # a new version has its own reference
            self.run_windows = 0
        self.window.append(p)
        if len(self.window) < self.s.drift_window:
            return None
        win, self.window = self.window, []
        return self.evaluate(win)

    def evaluate(self, win: list[Prediction]) -> DriftReport:
        version = win[0].model_version
        cur = pd.DataFrame([{**p.features, "score": p.score} for p in win])
        share, cols = drift_scores(self.reference(version), cur)
        drifted = share >= self.s.drift_share_threshold
        rep = DriftReport(model_name=self.s.model_name, model_version=version, window_start_ts=win[0].ts,
                          window_end_ts=win[-1].ts, rows=len(win), drift_share=share, drifted=drifted,
                          columns=cols)
        DRIFT_SHARE.labels(model=self.s.model_name).set(share)
        produce_event(self.producer, self.s, "drift.reports", rep, self.s.model_name)
        log.info("window v%s: drift share %.2f%s", version, share, " DRIFT" if drifted else "")
        self.run_windows = self.run_windows + 1 if drifted else 0
        if self.run_windows == 1:
            self.run_start_ts = rep.window_start_ts
        if self.run_windows >= self.s.drift_persist_windows and \
                time.monotonic() - self.last_request_s >= self.s.drift_cooldown_s:
            self.request("drift", {"report_id": rep.event_id, "drift_share": share, "windows": self.run_windows,
                                   "drifted_columns": [c for c, v in cols.items() if v["drifted"]]},
                          since_ts=self.run_start_ts)
        flush_or_raise(self.producer)
        return rep

    def request(self, reason: str, evidence: dict[str, Any], since_ts: int | None = None) -> str:
        req = RetrainRequest(model_name=self.s.model_name, reason=reason, evidence=evidence,  # type: ignore[arg-type]
                             since_ts=since_ts)
        produce_event(self.producer, self.s, "retrain.requests", req, self.s.model_name)
        flush_or_raise(self.producer)
        RETRAIN_REQUESTS.labels(reason=reason).inc()
        self.last_request_s = time.monotonic()
        log.info("retrain request %s (%s)", req.request_id, reason)
        return req.request_id

    def on_alert(self, alert: dict[str, Any]) -> str:
        """A webhook alert → a ``webhook`` retrain request (cooldown does not apply to explicit alerts)."""
        name = alert.get("model_name", self.s.model_name)
        if name != self.s.model_name:
            raise ValueError(f"unknown model {name!r}; this monitor watches {self.s.model_name!r}")
        since = alert.get("since_ts")
        if since is not None and not isinstance(since, int):
            raise ValueError("since_ts must be epoch microseconds (int)")
        return self.request("webhook", {"alert": alert}, since_ts=since)


def run(settings: Settings) -> None:
    stop = StopFlag()
    mon = Monitor(settings)
    server = start_webhook(settings.webhook_port, mon.on_alert)
    consumer = make_consumer(settings, f"{settings.topic_prefix}drift", ["predictions"])
    mark_ready(settings, "drift")
    try:
        while not stop:
            msgs = good_messages(consumer.consume(1000, 0.5))
            reported = False
            for m in msgs:
                try:
                    p = Prediction.from_bytes(m.value())
                except (ValidationError, ValueError):
                    continue
                reported = mon.add(p) is not None or reported
            if reported or (msgs and not mon.window):
                consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        server.shutdown()
