"""Outbound webhooks against real local HTTP receivers (http.server threads): retries, signatures, giving up."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import REGISTRY

from driftloop.drift.notify import Notifier

SECRET = "notify-secret"


@contextmanager
def receiver(answer: Callable[[int], int], delay_s: float = 0.0) -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP receiver: ``answer(n)`` is the status of the n-th request (from 0); every request is recorded
    as {headers, body, at}."""
    got: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                n = len(got)
                got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                            "at": time.monotonic()})
            time.sleep(delay_s)
            self.send_response(answer(n))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook?token=x", got
    finally:
        server.shutdown()
        server.server_close()


def outcomes(event: str) -> dict[str, float]:
    return {o: REGISTRY.get_sample_value("driftloop_notifications_total", {"event": event, "outcome": o}) or 0
            for o in ("sent", "retried", "given_up", "dropped")}


def valid(request: dict) -> bool:
    """Whether the request's signature is HMAC-SHA256(SECRET, ts + "." + body), computed here."""
    ts = request["headers"]["x-driftloop-timestamp"]
    want = hmac.new(SECRET.encode(), f"{ts}.".encode() + request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(request["headers"]["x-driftloop-signature"], f"sha256={want}") and \
        abs(time.time() - int(ts)) < 60


def test_delivered_once_after_two_failures_without_blocking_the_caller():
    before = outcomes("model.promoted")
    with receiver(lambda n: 500 if n < 2 else 204, delay_s=0.2) as (url, got):
        notifier = Notifier([url], SECRET, max_attempts=6, base_delay_s=0.05, max_delay_s=0.2)
        t0 = time.perf_counter()
        notifier.send("model.promoted", {"model_name": "fraud", "version": "3", "metrics": {"auc": 0.91}})
        took = time.perf_counter() - t0
        notifier.close(timeout=10)
    assert took < 0.05, took  # the receiver takes 0.2 s per request: send() did not wait for it
    assert len(got) == 3 and all(valid(r) for r in got)
    assert len({r["headers"]["x-driftloop-delivery"] for r in got}) == 1  # one delivery, three attempts
    assert {r["headers"]["x-driftloop-event"] for r in got} == {"model.promoted"}
    body = orjson.loads(got[-1]["body"])
    assert body["event"] == "model.promoted" and body["sent_at"].endswith("Z")
    assert body["payload"] == {"model_name": "fraud", "version": "3", "metrics": {"auc": 0.91}}
    gaps = [b["at"] - a["at"] for a, b in zip(got, got[1:], strict=False)]
    assert all(g >= 0.2 + 0.02 for g in gaps), gaps  # the receiver's time plus a backoff of at least half a delay
    after = outcomes("model.promoted")
    assert {k: after[k] - before[k] for k in after} == {"sent": 1, "retried": 2, "given_up": 0, "dropped": 0}


def test_given_up_after_max_attempts(caplog):
    before = outcomes("model.rejected")
    with receiver(lambda n: 503) as (url, got):
        notifier = Notifier([url], SECRET, max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)
        with caplog.at_level("WARNING", logger="driftloop.drift.notify"):
            notifier.send("model.rejected", {"model_name": "fraud"})
            notifier.close(timeout=10)
    assert len(got) == 3 and all(valid(r) for r in got)
    after = outcomes("model.rejected")
    assert {k: after[k] - before[k] for k in after} == {"sent": 0, "retried": 2, "given_up": 1, "dropped": 0}
    (line,) = [r.getMessage() for r in caplog.records if "given up" in r.getMessage()]
    assert "after 3 attempts" in line and "token=x" not in line  # the URL's query is not logged


def test_unreachable_receiver_is_retried_then_given_up():
    before = outcomes("drift.detected")
    with receiver(lambda n: 200) as (url, _):
        pass  # closed: nothing listens there now
    notifier = Notifier([url], SECRET, max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, timeout_s=1)
    notifier.send("drift.detected", {"model_name": "fraud"})
    notifier.close(timeout=10)
    after = outcomes("drift.detected")
    assert after["given_up"] - before["given_up"] == 1 and after["retried"] - before["retried"] == 1


def test_full_queue_drops_and_every_url_gets_its_own_delivery():
    before = outcomes("retrain.requested")
    release = threading.Event()
    def held(n: int) -> int:  # nothing is answered before every send: deliveries stay pending
        return 200 if release.wait(10) else 500

    with receiver(held) as (url_a, got_a), receiver(held) as (url_b, _):
        notifier = Notifier([url_a, url_b], SECRET, max_pending=4)
        for i in range(3):  # 6 deliveries with room for 4: the third event is dropped for both URLs
            notifier.send("retrain.requested", {"i": i})
        release.set()
        notifier.close(timeout=10)
    after = outcomes("retrain.requested")
    assert after["dropped"] - before["dropped"] == 2 and after["sent"] - before["sent"] == 4
    assert sorted(orjson.loads(r["body"])["payload"]["i"] for r in got_a) == [0, 1]


def test_without_urls_nothing_happens():
    threads = threading.active_count()
    notifier = Notifier([], SECRET)
    notifier.send("model.rolled_back", {"model_name": "fraud"})
    notifier.close()
    assert threading.active_count() == threads and outcomes("model.rolled_back") == dict.fromkeys(outcomes(""), 0)
