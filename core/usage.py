"""Usage metering for cost attribution: per model, training and scoring compute seconds, scored events and
predictions served.

Each worker adds to a :class:`UsageMeter` as it works (the Prometheus counters move at once) and the meter
appends its sums to the state database's ``usage`` table every ``flush_s`` seconds and on close, so
``driftloop usage --since`` and the retrain controller's training quota see them across restarts. A crash
loses at most the last ``flush_s`` seconds of metering, never the work itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import datetime

from sqlalchemy import func, insert, select

from driftloop.core import database as db
from driftloop.core.metrics import PREDICTIONS, SCORED_EVENTS, SCORING_SECONDS, TRAINING_SECONDS
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("training_seconds", "scoring_seconds", "events", "predictions")
DAY_S = 86_400.0


class UsageMeter:
    """Thread-safe sums per (model, kind), appended to the state database now and then."""

    def __init__(self, settings: Settings, component: str, flush_s: float = 10.0):
        self.s, self.component, self.flush_s = settings, component, flush_s
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._lock = threading.Lock()
        self._next = time.monotonic() + flush_s

    def add(self, model: str, kind: str, amount: float) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown usage kind {kind!r}; one of {', '.join(KINDS)}")
        if amount <= 0:
            return
        with self._lock:
            self._sums[(model, kind)] += amount
        due = time.monotonic() >= self._next
        if due:
            self.flush()

    def flush(self) -> int:
        """Append the sums so far; the number of rows written (a failed write keeps them for the next)."""
        with self._lock:
            sums, self._sums = dict(self._sums), defaultdict(float)
            self._next = time.monotonic() + self.flush_s
        if not sums:
            return 0
        at = int(time.time() * 1e6)
        rows = [{"model": m, "kind": k, "amount": v, "at_us": at, "component": self.component}
                for (m, k), v in sums.items()]
        try:
            with db.engine(self.s).begin() as conn:
                conn.execute(insert(db.usage), rows)
        except Exception as e:  # noqa: BLE001 - metering must never stop the work it meters
            log.warning("usage not recorded yet (kept for the next flush): %s", e)
            with self._lock:
                for key, v in sums.items():
                    self._sums[key] += v
            return 0
        return len(rows)

    close = flush


def meter_scoring(meter: UsageMeter, model: str, version: str, events: int, predictions: int,
                  cpu_s: float) -> None:
    """One scored batch: counters and usage."""
    SCORED_EVENTS.labels(model=model).inc(events)
    SCORING_SECONDS.labels(model=model).inc(cpu_s)
    if predictions:
        PREDICTIONS.labels(model=model, version=version).inc(predictions)
    meter.add(model, "events", events)
    meter.add(model, "predictions", predictions)
    meter.add(model, "scoring_seconds", cpu_s)


def meter_training(settings: Settings, model: str, seconds: float) -> None:
    """A training run's compute seconds (wall seconds × workers), recorded at once."""
    TRAINING_SECONDS.labels(model=model).inc(seconds)
    meter = UsageMeter(settings, "retrain")
    meter.add(model, "training_seconds", seconds)
    meter.flush()


def totals(settings: Settings, since: datetime | None = None, model: str | None = None
           ) -> dict[str, dict[str, float]]:
    """{model: {kind: amount}} since a time (all time when None)."""
    q = select(db.usage.c.model, db.usage.c.kind, func.sum(db.usage.c.amount)).group_by(db.usage.c.model,
                                                                                         db.usage.c.kind)
    if since is not None:
        q = q.where(db.usage.c.at_us >= int(since.timestamp() * 1e6))
    if model is not None:
        q = q.where(db.usage.c.model == model)
    out: dict[str, dict[str, float]] = {}
    with db.engine(settings).connect() as conn:
        for m, k, v in conn.execute(q):
            out.setdefault(m, dict.fromkeys(KINDS, 0.0))[k] = float(v)
    return out


def training_used(settings: Settings, model: str, window_s: float = DAY_S) -> float:
    """Training compute seconds the model used in the last ``window_s`` seconds."""
    since = datetime.fromtimestamp(time.time() - window_s).astimezone()
    return totals(settings, since, model).get(model, {}).get("training_seconds", 0.0)
