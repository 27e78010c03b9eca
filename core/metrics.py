"""Prometheus metrics: one registry per process, served on the worker's metrics port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

EVENTS_IN = Counter("driftloop_events_in_total", "Records consumed", ["component", "topic"])
DLQ = Counter("driftloop_dlq_total", "Records sent to the dead-letter topic", ["reason"])
ROWS_WRITTEN = Counter("driftloop_rows_written_total", "Rows written per sink", ["sink"])
BATCH_SIZE = Histogram("driftloop_batch_size", "Records per processed batch", ["component"],
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000))
CONSUMER_LAG = Gauge("driftloop_consumer_lag", "Records behind the partition end after a batch (approximate on "
                     "Tansu, whose end offsets run short)", ["component", "topic", "partition"])
FRESHNESS = Histogram("driftloop_feature_freshness_seconds", "Event time to online write",
                      buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 5, 10))
PREDICTIONS = Counter("driftloop_predictions_total", "Predictions published", ["model", "model_version"])
PREDICTION_LATENCY = Histogram("driftloop_prediction_latency_seconds", "Event time to prediction", ["model"],
                               buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
SERVING_VERSION = Gauge("driftloop_serving_model_version", "Model version being served", ["model"])
SWAPS = Counter("driftloop_model_swaps_total", "Hot swaps done", ["model"])
SWAP_SECONDS = Histogram("driftloop_model_swap_seconds", "Alias seen → new version serving (load, verify, swap)",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
MODEL_REJECTS = Counter("driftloop_model_rejects_total", "Versions serving refused to load, by failed check",
                        ["model", "check"])
DRIFT_SHARE = Gauge("driftloop_drift_share", "Share of drifted columns in the last window", ["model"])
DRIFT_SCORE = Gauge("driftloop_drift_score", "Drift score of a column in the last window (method in the label)",
                    ["model", "column", "method"])
DRIFT_EPISODE = Gauge("driftloop_drift_episode", "1 while a model is in a drift episode", ["model"])
PERFORMANCE = Gauge("driftloop_model_performance", "Primary metric of the last window: estimated (label-free) or "
                    "realised (labels joined)", ["model", "metric", "kind"])
DRIFT_CHECK_SECONDS = Histogram("driftloop_drift_check_seconds", "One window's drift check", ["model"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
WEBHOOK_REQUESTS = Counter("driftloop_webhook_requests_total", "Inbound alert webhook requests", ["route", "code"])
NOTIFICATIONS = Counter("driftloop_notifications_total", "Outbound webhooks by outcome (sent, retried, given_up)",
                        ["event", "outcome"])
RETRAIN_REQUESTS = Counter("driftloop_retrain_requests_total", "Retrain requests", ["model", "reason"])
TRAINING_RUNS = Counter("driftloop_training_runs_total", "Training jobs finished", ["model", "outcome"])
LABELS = Counter("driftloop_labels_total", "Labels emitted by the label joins", ["model"])
LATE_OUTCOMES = Counter("driftloop_late_outcomes_total", "Outcomes that arrived after their label was final "
                        "(dead-lettered, reason late_outcome)", ["model"])
# batch jobs (consistency) write their own registry to a textfile for node-exporter's textfile collector
JOBS = CollectorRegistry()
CONSISTENCY = Gauge("driftloop_consistency_mismatch_share", "Share of rows whose value differs: offline = stream "
                    "rows vs the Spark recompute, online = online store vs the recompute at the latest event",
                    ["view", "feature", "check"], registry=JOBS)


def serve_metrics(port: int) -> None:
    """Expose /metrics on ``port`` (0 = disabled)."""
    if port:
        start_http_server(port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%d/metrics", port)
