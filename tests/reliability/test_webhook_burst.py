"""Webhook abuse over real HTTP: one sender fires 1,000 requests in 10 s at the drift worker's alert webhook,
valid and invalid mixed. The rate limit holds (per credential, as configured by default), each model gets at
most one retraining request, and the worker keeps working."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from driftloop.bench.serving import read_all
from driftloop.core.broker import free_port
from driftloop.core.contracts import RetrainRequest
from driftloop.core.metrics import scrape
from driftloop.core.settings import Settings
from tests.helpers import apply_repo, worker
from tests.test_drift_worker import alertmanager
from tests.test_retrain import items_repo

pytestmark = pytest.mark.reliability

TOKEN = "burst-token-" + "y" * 24
MODELS = ("m_bin", "m_reg", "m_mc", "m_custom")
N, SECONDS = 1000, 10.0


def _request(rng: random.Random, base: str) -> tuple[str, dict[str, Any]]:
    """A (kind, requests.post kwargs) drawn from the mix: valid alerts, and every kind of bad one."""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    kind = rng.choice(["valid", "valid", "valid", "resolved", "unknown_model", "bad_token", "no_auth",
                       "bad_json", "wrong_shape", "oversize"])
    model = rng.choice(MODELS)
    body: Any = alertmanager("firing", model=model, fingerprint=uuid.uuid4().hex[:12])
    headers = dict(bearer)
    if kind == "resolved":
        body = alertmanager("resolved", model=model, fingerprint=uuid.uuid4().hex[:12])
    elif kind == "unknown_model":
        body = alertmanager("firing", model="ghost", fingerprint=uuid.uuid4().hex[:12])
    elif kind == "bad_token":
        headers = {"Authorization": "Bearer wrong-" + "z" * 20}
    elif kind == "no_auth":
        headers = {}
    elif kind == "bad_json":
        return kind, {"url": f"{base}/v1/alerts/alertmanager", "data": b"{not json", "headers": headers}
    elif kind == "wrong_shape":
        body = {"alerts": "nope", "version": 4}
    elif kind == "oversize":
        return kind, {"url": f"{base}/v1/alerts/alertmanager", "data": b"[" + b"1," * 600_000 + b"1]",
                      "headers": {**headers, "Content-Type": "application/json"}}
    return kind, {"url": f"{base}/v1/alerts/alertmanager", "data": orjson.dumps(body),
                  "headers": {**headers, "Content-Type": "application/json"}}


def test_a_burst_of_1000_requests_from_one_sender(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    s = Settings(data_dir=tmp_path / "data", repo=items_repo(tmp_path), bootstrap_servers=bootstrap_servers,
                 partitions=2, topic_prefix=f"wb{uuid.uuid4().hex[:8]}.", webhook_token=TOKEN,
                 webhook_port=free_port(), metrics_port=free_port())
    apply_repo(s)
    base = f"http://127.0.0.1:{s.webhook_port}"
    rng = random.Random(16)
    plan = [_request(rng, base) for _ in range(N)]
    results: list[tuple[int, int, float]] = []  # plan index, status, seconds after the start
    lock = threading.Lock()
    with worker(s, "drift") as proc:
        session_local = threading.local()
        t0 = time.monotonic()

        def send(i: int) -> None:
            time.sleep(max(0.0, t0 + i * SECONDS / N - time.monotonic()))
            kw = plan[i][1]
            http = getattr(session_local, "s", None) or requests.Session()
            session_local.s = http
            try:
                code = http.post(timeout=30, **kw).status_code
            except requests.ConnectionError:  # the server may close a connection it refused a 1 MB body on
                code = -1
            with lock:
                results.append((i, code, time.monotonic() - t0))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(send, range(N)))
        elapsed = max(t for _, _, t in results)
        assert proc.poll() is None, "the drift worker died under the burst"
        assert requests.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        beat = ("driftloop_worker_heartbeat_timestamp_seconds", (("component", "drift"),))
        beat_before = scrape(s.metrics_port)[beat]
        time.sleep(3)
        beat_after = scrape(s.metrics_port)[beat]
        retry = requests.post(**_request(random.Random(1), base)[1], timeout=10)  # a bucket refilled by now
    kinds = [(plan[i][0], code) for i, code, _ in results]
    codes = Counter(code for _, code in kinds)
    by_kind = {k: Counter(c for kk, c in kinds if kk == k) for k, _ in kinds}
    # one bucket per sender and credential; an oversize body is refused (413) before the limiter, by its length
    valid_creds = [c for k, c in kinds if k not in ("bad_token", "no_auth", "oversize")]
    passed = sum(c != 429 for c in valid_creds)
    bound = 20 + 5.0 * elapsed + 1  # the default burst and rate (settings.webhook_burst, webhook_rate_per_s)
    assert passed <= bound, f"{passed} requests of one sender passed in {elapsed:.1f}s (at most {bound:.0f}): {by_kind}"
    assert codes[429] > 0
    assert not {c for c in codes if c >= 500}, f"server errors: {codes}"
    for k in ("bad_json", "wrong_shape", "unknown_model"):
        assert set(by_kind.get(k, {})) <= {400, 422, 404, 429, 413}, (k, by_kind[k])
    assert set(by_kind.get("bad_token", {})) <= {401, 429} and set(by_kind.get("no_auth", {})) <= {401, 429}
    assert set(by_kind.get("oversize", {})) <= {413, -1}
    reqs = [RetrainRequest.from_bytes(m.value()) for m in read_all(s, "retrain.requests", 10**6, timeout=0, idle_s=1)]
    per_model = Counter(r.model_name for r in reqs)
    accepted_models = {orjson.loads(plan[i][1]["data"])["alerts"][0]["labels"]["model"]
                       for i, c, _ in results if plan[i][0] == "valid" and c == 202}
    assert all(n == 1 for n in per_model.values()), f"more than one retrain request for a model: {per_model}"
    assert set(per_model) <= set(MODELS) and per_model, "no valid alert became a retrain request"
    assert accepted_models <= set(per_model)
    assert retry.status_code in (200, 202), retry.text  # the limiter lets the sender in again
    assert beat_after > beat_before, "the worker's heartbeat stopped"
    figure("webhook burst: requests sent", N, "requests", seconds=round(elapsed, 1))
    figure("webhook burst: passed the limiter", passed, "requests", bound=int(bound))
    figure("webhook burst: refused 429", codes[429], "requests")
    figure("webhook burst: retrain requests per model (max)", max(per_model.values()), "requests")
