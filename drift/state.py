"""The drift worker's durable state (sqlite under ``<data_dir>/drift``): episodes, requests, alert keys.

It survives restarts, so a restarted monitor neither asks twice for one episode nor lets a re-sent
alert start a second retrain. A request is in flight from its publication until the retrain worker
publishes its outcome (``models.promoted`` / ``models.rejected`` with its ``request_id``), or until
``in_flight_s`` passed without one (a lost outcome must not block a model forever).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal

import orjson

Decision = Literal["go", "duplicate", "in_flight", "cooldown", "over_budget"]
DAY_S = 86400.0
KEY_TTL_S = 7 * DAY_S

SCHEMA = """
CREATE TABLE IF NOT EXISTS episodes (model TEXT PRIMARY KEY, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, model TEXT NOT NULL, reason TEXT NOT NULL,
    sent_at REAL NOT NULL, done_at REAL, outcome TEXT);
CREATE INDEX IF NOT EXISTS requests_model ON requests (model, sent_at);
CREATE TABLE IF NOT EXISTS alert_keys (key TEXT PRIMARY KEY, request_id TEXT NOT NULL, at REAL NOT NULL);
"""


class DriftState:
    """Thread-safe: the monitor loop and the webhook's threads share one instance."""

    def __init__(self, path: Path, in_flight_s: float = 6 * 3600.0):
        self.in_flight_s = in_flight_s
        self.lock = threading.RLock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def episode(self, model: str) -> dict[str, Any] | None:
        with self.lock:
            row = self.db.execute("SELECT state FROM episodes WHERE model = ?", (model,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def save_episode(self, model: str, state: dict[str, Any]) -> None:
        with self.lock:
            self.db.execute("INSERT INTO episodes VALUES (?, ?) "
                            "ON CONFLICT (model) DO UPDATE SET state = excluded.state", (model, orjson.dumps(state)))

    def in_flight(self, model: str, now: float) -> str | None:
        """The id of the model's request still waiting for its outcome, if any."""
        with self.lock:
            row = self.db.execute("SELECT request_id FROM requests WHERE model = ? AND done_at IS NULL AND sent_at > ? "
                                  "ORDER BY sent_at DESC LIMIT 1", (model, now - self.in_flight_s)).fetchone()
        return row[0] if row else None

    def decide(self, model: str, key: str | None, now: float, *, cooldown_s: float | None,
               budget_per_day: int) -> tuple[Decision, str | None]:
        """Whether a request for ``model`` may go out now, and the id it repeats or waits for. ``key``
        (an alert's dedupe key) already seen → duplicate; a request in flight → in_flight; then the
        cooldown since the model's last request (None: no cooldown) and its requests in the last day."""
        with self.lock:
            if key is not None:
                row = self.db.execute("SELECT request_id FROM alert_keys WHERE key = ? AND at > ?",
                                      (key, now - KEY_TTL_S)).fetchone()
                if row:
                    return "duplicate", row[0]
            if (busy := self.in_flight(model, now)) is not None:
                if key is not None:
                    self._remember(key, busy, now)
                return "in_flight", busy
            last, n = self.db.execute("SELECT MAX(sent_at), COUNT(*) FROM requests WHERE model = ? AND sent_at > ?",
                                      (model, now - DAY_S)).fetchone()
            if cooldown_s is not None and last is not None and now - last < cooldown_s:
                return "cooldown", None
            if n >= budget_per_day:
                return "over_budget", None
            return "go", None

    def record(self, request_id: str, model: str, reason: str, key: str | None, now: float) -> None:
        """A request the broker acknowledged."""
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO requests (request_id, model, reason, sent_at) VALUES (?, ?, ?, ?)",
                            (request_id, model, reason, now))
            if key is not None:
                self._remember(key, request_id, now)

    def done(self, request_id: str, outcome: str, now: float) -> bool:
        """A request's outcome arrived; whether it was one of ours."""
        with self.lock:
            cur = self.db.execute("UPDATE requests SET done_at = ?, outcome = ? "
                                  "WHERE request_id = ? AND done_at IS NULL", (now, outcome, request_id))
            return cur.rowcount > 0

    def requests(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every recorded request (oldest first), for reports and tests."""
        with self.lock:
            cur = self.db.execute("SELECT request_id, model, reason, sent_at, done_at, outcome FROM requests "
                                  "WHERE ? IS NULL OR model = ? ORDER BY sent_at", (model, model))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def _remember(self, key: str, request_id: str, now: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO alert_keys VALUES (?, ?, ?)", (key, request_id, now))
        self.db.execute("DELETE FROM alert_keys WHERE at < ?", (now - KEY_TTL_S,))
