"""Outbound webhooks: HMAC-signed JSON POSTs of driftloop's events, retried, never blocking the caller.

``Notifier.send(event, payload)`` queues one delivery per URL and returns at once; a daemon thread POSTs
``{"event", "payload", "sent_at"}`` signed like inbound requests (:func:`driftloop.drift.auth.sign`, a fresh
timestamp per attempt) with ``X-Driftloop-Event`` and ``X-Driftloop-Delivery`` (one id per delivery, the same on
every attempt, so receivers can drop repeats). A non-2xx answer or a connection error is tried again after an
exponential, jittered delay (at least the receiver's Retry-After seconds, at most ``max_delay_s``); after
``max_attempts`` the delivery is given up. A full queue drops new deliveries. Every outcome is counted in
``NOTIFICATIONS[event, sent|retried|given_up|dropped]`` and the bad ones are logged.
Events: drift.detected, retrain.requested, model.promoted, model.rejected, model.rolled_back.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from driftloop.core.metrics import NOTIFICATIONS
from driftloop.drift.auth import sign

log = logging.getLogger(__name__)


@dataclass(order=True)
class Delivery:
    """One event to one URL; ordered by when it is due."""

    due: float
    seq: int
    url: str = field(compare=False)
    event: str = field(compare=False)
    payload: bytes = field(compare=False)  # serialised once, at send()
    delivery_id: str = field(compare=False)
    attempts: int = field(default=0, compare=False)


def redact(url: str) -> str:
    """A URL fit for logs: no credentials, no query."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}{u.path}"


def retry_after(resp: httpx.Response | None) -> float:
    """The receiver's Retry-After in seconds (0 when absent or a date)."""
    value = resp.headers.get("retry-after", "") if resp is not None else ""
    return float(value) if value.isdigit() else 0.0


class Notifier:
    """Signed outbound webhooks to ``urls`` (none: every send is a no-op); thread-safe."""

    def __init__(self, urls: list[str], secret: str, *, max_attempts: int = 6, base_delay_s: float = 0.5,
                 max_delay_s: float = 30, timeout_s: float = 5, max_pending: int = 1000):
        self.urls, self.secret = list(urls), secret
        self.max_attempts, self.base_delay_s, self.max_delay_s = max_attempts, base_delay_s, max_delay_s
        self.max_pending = max_pending
        self._heap: list[Delivery] = []
        self._pending = 0  # queued or being tried
        self._cv = threading.Condition()
        self._closing = False
        self._abandoned = False  # close() timed out: what is left is not tried again
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        if self.urls:
            self._client = httpx.Client(timeout=timeout_s, headers={"User-Agent": "driftloop-notifier"})
            self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
            self._thread.start()

    def send(self, event: str, payload: dict[str, Any]) -> None:
        """Queue ``event`` for every URL and return at once (dropped, counted and logged when the queue is full)."""
        if not self.urls:
            return
        body = orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
        now = time.monotonic()
        with self._cv:
            for url in self.urls:
                if self._closing or self._pending >= self.max_pending:
                    NOTIFICATIONS.labels(event=event, outcome="dropped").inc()
                    log.warning("notification %s to %s dropped: %s", event, redact(url),
                                "closing" if self._closing else f"{self._pending} deliveries pending")
                    continue
                self._pending += 1
                heapq.heappush(self._heap, Delivery(now, next(self._seq), url, event, body, uuid.uuid4().hex))
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking events; wait up to ``timeout`` for the queued ones (retries included) to finish."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        with self._cv:
            self._closing = True
            self._cv.notify()
            while self._pending and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            left = self._pending
            self._abandoned = True
            self._pending -= len(self._heap)
            self._heap.clear()
            self._cv.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1)
        self._client.close()
        if left:
            log.warning("notifier closed with %d deliveries unfinished", left)

    def _next(self) -> Delivery | None:
        """The next due delivery, waiting for it; None once closing with nothing left."""
        with self._cv:
            while True:
                if not self._heap:
                    if self._closing:
                        return None
                    self._cv.wait()
                    continue
                wait = self._heap[0].due - time.monotonic()
                if wait <= 0:
                    return heapq.heappop(self._heap)
                self._cv.wait(wait)

    def _run(self) -> None:
        while (d := self._next()) is not None:
            d.attempts += 1
            resp, error = self._post(d)
            with self._cv:
                if error is None:
                    NOTIFICATIONS.labels(event=d.event, outcome="sent").inc()
                elif d.attempts >= self.max_attempts:
                    NOTIFICATIONS.labels(event=d.event, outcome="given_up").inc()
                    log.warning("notification %s to %s given up after %d attempts: %s", d.event, redact(d.url),
                                d.attempts, error)
                elif not self._abandoned:
                    NOTIFICATIONS.labels(event=d.event, outcome="retried").inc()
                    delay = min(self.max_delay_s, self.base_delay_s * 2 ** (d.attempts - 1))
                    d.due = time.monotonic() + max(delay * random.uniform(0.5, 1.0), min(retry_after(resp),
                                                                                         self.max_delay_s))
                    heapq.heappush(self._heap, d)
                    log.info("notification %s to %s: %s; attempt %d in %.1f s", d.event, redact(d.url), error,
                             d.attempts + 1, d.due - time.monotonic())
                    continue
                self._pending -= 1
                self._cv.notify_all()

    def _post(self, d: Delivery) -> tuple[httpx.Response | None, str | None]:
        """One attempt: (the response if any, None when delivered else what went wrong)."""
        sent_at = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        body = orjson.dumps({"event": d.event, "payload": orjson.Fragment(d.payload), "sent_at": sent_at})
        headers = {"Content-Type": "application/json", "X-Driftloop-Event": d.event,
                   "X-Driftloop-Delivery": d.delivery_id, **sign(self.secret, body)}
        try:
            resp = self._client.post(d.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}"
        if 200 <= resp.status_code < 300:
            return resp, None
        return resp, f"HTTP {resp.status_code}"
