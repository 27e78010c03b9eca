"""Prometheus metrics: one registry per process, served on the worker's metrics port.

Names follow Prometheus conventions (``driftloop_`` prefix, base units, ``_total`` counters) and share
labels: ``component`` (streams, serving, drift, retrain), ``model``, ``version``, ``view``, ``topic``.
``deploy/prometheus/rules.yml`` (recording + alerting rules) and the Grafana dashboard are built on them;
``tests/test_slo_config.py`` checks that every name they use is defined here.
"""

from __future__ import annotations

import logging
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 5, 10)

# every worker
WORKER_INFO = Gauge("driftloop_worker_info", "1 per running worker, with its component", ["component"])
HEARTBEAT = Gauge("driftloop_worker_heartbeat_timestamp_seconds", "Unix time the worker's loop last turned "
                  "(idle or not)", ["component"])
PROGRESS = Gauge("driftloop_worker_progress_timestamp_seconds", "Unix time the worker last committed work",
                 ["component"])
EVENTS_IN = Counter("driftloop_events_in_total", "Records consumed", ["component", "topic"])
CONSUMER_LAG = Gauge("driftloop_consumer_lag", "Records behind the partition end after a batch (approximate on "
                     "Tansu, whose end offsets run short)", ["component", "topic", "partition"])
BATCH_SIZE = Histogram("driftloop_batch_size", "Records per processed batch", ["component"],
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000))
DLQ = Counter("driftloop_dlq_total", "Records sent to the dead-letter topic, by source topic and reason",
              ["component", "topic", "reason"])
STORE_ERRORS = Counter("driftloop_store_errors_total", "Failed store operations (retried; no offset is committed "
                       "past them)", ["component", "store"])
STORE_UP = Gauge("driftloop_store_up", "1 while the worker's last operation on the store succeeded, 0 while it "
                 "fails", ["component", "store"])

# streams
ROWS_WRITTEN = Counter("driftloop_rows_written_total", "Rows written per sink", ["sink"])
FRESHNESS = Histogram("driftloop_feature_freshness_seconds", "Event time to online write, per stream view",
                      ["view"], buckets=LATENCY_BUCKETS)
LABELS = Counter("driftloop_labels_total", "Labels emitted by the label joins", ["model"])
LATE_OUTCOMES = Counter("driftloop_late_outcomes_total", "Outcomes that arrived after their label was final "
                        "(dead-lettered, reason late_outcome)", ["model"])

# serving
PREDICTIONS = Counter("driftloop_predictions_total", "Predictions published", ["model", "version"])
PREDICTION_LATENCY = Histogram("driftloop_prediction_latency_seconds", "Event time to prediction", ["model"],
                               buckets=LATENCY_BUCKETS)
SCORING_SECONDS = Counter("driftloop_scoring_compute_seconds_total", "CPU seconds spent scoring (feature lookup, "
                          "model, publish), per model", ["model"])
SCORED_EVENTS = Counter("driftloop_scored_events_total", "Scored events processed (predicted or dead-lettered)",
                        ["model"])
SERVING_VERSION = Gauge("driftloop_serving_model_version", "Model version being served", ["model"])
SWAPS = Counter("driftloop_model_swaps_total", "Hot swaps done", ["model"])
SWAP_SECONDS = Histogram("driftloop_model_swap_seconds", "Alias seen → new version serving (load, verify, swap)",
                         ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
MODEL_REJECTS = Counter("driftloop_model_rejects_total", "Versions serving refused to load, by failed check",
                        ["model", "check"])

# drift
DRIFT_SHARE = Gauge("driftloop_drift_share", "Share of drifted columns in the last window", ["model"])
DRIFT_SHARE_THRESHOLD = Gauge("driftloop_drift_share_threshold", "The model's declared drift share threshold",
                              ["model"])
DRIFT_SCORE = Gauge("driftloop_drift_score", "Drift score of a column in the last window (method in the label)",
                    ["model", "column", "method"])
DRIFT_EPISODE = Gauge("driftloop_drift_episode", "1 while a model is in a drift episode", ["model"])
DRIFT_WINDOWS = Counter("driftloop_drift_windows_total", "Windows checked, by whether they breached", ["model",
                        "breached"])
PERFORMANCE = Gauge("driftloop_model_performance", "Primary metric of the last window: estimated (label-free) or "
                    "realised (labels joined)", ["model", "metric", "kind"])
PERFORMANCE_REFERENCE = Gauge("driftloop_model_performance_reference", "The champion's reference value of the "
                              "primary metric, per kind", ["model", "metric", "kind"])
PERFORMANCE_DROP = Gauge("driftloop_model_performance_drop", "Relative degradation of the last window against the "
                         "reference (positive = worse, whichever way the metric points)", ["model", "kind"])
PERFORMANCE_TOLERANCE = Gauge("driftloop_model_performance_tolerance", "The model's declared tolerated relative "
                              "degradation", ["model"])
DRIFT_CHECK_SECONDS = Histogram("driftloop_drift_check_seconds", "One window's drift check", ["model"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
WEBHOOK_REQUESTS = Counter("driftloop_webhook_requests_total", "Inbound alert webhook requests", ["route", "code"])
NOTIFICATIONS = Counter("driftloop_notifications_total", "Outbound webhooks by outcome (sent, retried, given_up)",
                        ["event", "outcome"])
RETRAIN_REQUESTS = Counter("driftloop_retrain_requests_total", "Retrain requests", ["model", "reason"])

# retrain
TRAINING_RUNS = Counter("driftloop_training_runs_total", "Retrain requests finished or trained, by outcome "
                        "(trained, promoted, rejected, failed, refused)", ["model", "outcome"])
RETRAIN_SECONDS = Histogram("driftloop_retrain_duration_seconds", "Request stored → final state, by outcome",
                            ["model", "outcome"], buckets=(10, 30, 60, 120, 300, 600, 1200, 3600))
TRAINING_SECONDS = Counter("driftloop_training_compute_seconds_total", "Training compute seconds (wall seconds × "
                           "workers of each run), per model", ["model"])
TRAINING_BUDGET = Gauge("driftloop_training_budget_seconds", "The model's training budget per day (0: none)",
                        ["model"])

# batch jobs (consistency) write their own registry to a textfile for node-exporter's textfile collector
JOBS = CollectorRegistry()
CONSISTENCY = Gauge("driftloop_consistency_mismatch_share", "Share of rows whose value differs: offline = stream "
                    "rows vs the Spark recompute, online = online store vs the recompute at the latest event",
                    ["view", "feature", "check"], registry=JOBS)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class StoreHealth:
    """One store as one worker sees it: ``driftloop_store_up`` and ``driftloop_store_errors_total``, and one log
    line when it starts failing (``down``) and one when it answers again (``up``), not one per failure."""

    def __init__(self, component: str, store: str, down: str, up: str, logger: logging.Logger = log):
        self.component, self.store, self.down, self.up, self.log = component, store, down, up, logger
        self.since: float | None = None  # monotonic time of the first failure of the outage

    def failed(self, error: BaseException) -> None:
        STORE_ERRORS.labels(self.component, self.store).inc()
        STORE_UP.labels(self.component, self.store).set(0)
        if self.since is None:
            self.since = time.monotonic()
            text = str(error).strip()
            self.log.error("%s: %s", self.down, text.splitlines()[0][:300] if text else type(error).__name__)

    def ok(self) -> None:
        STORE_UP.labels(self.component, self.store).set(1)
        if self.since is not None:
            self.log.info("%s after %.1fs", self.up, time.monotonic() - self.since)
            self.since = None


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> Samples:
    """Every sample of a worker's ``/metrics`` as ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q``-quantile of a cumulative histogram (upper bound ``le`` → count), interpolated within its
    bucket as Prometheus' ``histogram_quantile`` does (the highest finite bound when it falls in +Inf);
    None when it holds no observation."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank, lo, prev = q * buckets[edges[-1]], 0.0, 0.0
    for e in edges:
        c = buckets[e]
        if c >= rank:
            return lo if e == float("inf") else lo + (e - lo) * (rank - prev) / max(c - prev, 1e-12)
        lo, prev = e, c
    return edges[-1]


def serve_metrics(port: int, component: str | None = None, host: str = "127.0.0.1") -> None:
    """Expose /metrics on ``host:port`` (port 0 = disabled), and mark ``component`` as running."""
    if component:
        WORKER_INFO.labels(component=component).set(1)
        beat(component)
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)


def beat(component: str, progressed: bool = False) -> None:
    """The worker's loop turned (and, with ``progressed``, committed work)."""
    now = time.time()
    HEARTBEAT.labels(component=component).set(now)
    if progressed:
        PROGRESS.labels(component=component).set(now)
