"""The inbound alert webhooks over real HTTP (uvicorn on loopback), driving a small in-test sink.

Signatures are computed here with hmac directly, never with the code under test (except one check that
``sign`` agrees with them). The monitor-backed tests (a running drift worker, the real broker) live with the
monitor's tests.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
from prometheus_client import REGISTRY

from driftloop.core.kafka import DeliveryError
from driftloop.core.settings import Settings
from driftloop.drift.auth import WebhookAuth, load_or_create_token, sign
from driftloop.drift.webhook import WebhookServer, create_app, start_server

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ["churn", "fraud"]


class DictSink:
    """An AlertSink in a dict: a known key is a duplicate; a model with an unfinished request is in flight (and
    the key of an alert answered so belongs to that request: its re-sends are duplicates)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.by_key: dict[str, str] = {}
        self.running: dict[str, str] = {}  # model -> request id
        self.requests: list[dict[str, Any]] = []
        self.broker_down = False
        self.refusal: str | None = None  # e.g. "over_budget": every new request is refused so

    def models(self) -> list[str]:
        return list(MODELS)

    def alert(self, model: str, reason: str, evidence: dict[str, Any], key: str | None) -> tuple[str, str]:
        with self.lock:
            if self.broker_down:
                raise DeliveryError("1 of 1 records not delivered")
            if key is not None and key in self.by_key:
                return self.by_key[key], "duplicate"
            if model in self.running:
                if key is not None:
                    self.by_key[key] = self.running[model]
                return self.running[model], "in_flight"
            if self.refusal:
                return "", self.refusal
            rid = uuid.uuid4().hex
            self.requests.append({"request_id": rid, "model": model, "reason": reason, "evidence": evidence,
                                  "key": key})
            self.running[model] = rid
            if key is not None:
                self.by_key[key] = rid
            return rid, "accepted"

    def finish(self) -> None:
        """Every request has run (a later alert of the same model may retrain again)."""
        with self.lock:
            self.running.clear()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[WebhookServer, DictSink]]:
    sink = DictSink()
    server = start_server(create_app(sink, WebhookAuth(TOKEN, max_skew_s=60), max_body=1 << 20, rate_per_s=1000,
                                     burst=1000), "127.0.0.1", 0)
    yield server, sink
    server.stop()


@pytest.fixture
def hook(served: tuple[WebhookServer, DictSink]) -> tuple[str, DictSink]:
    server, sink = served
    sink.reset()
    return server.url, sink


def signed(body: bytes, ts: int | None = None, key: str = TOKEN) -> dict[str, str]:
    """Signature headers computed independently of driftloop.drift.auth."""
    ts = int(time.time()) if ts is None else ts
    digest = hmac.new(key.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Driftloop-Timestamp": str(ts), "X-Driftloop-Signature": f"sha256={digest}",
            "Content-Type": "application/json"}


def am_alert(model: str | None, fingerprint: str, status: str = "firing", **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": "FeatureDrift", **({"model": model} if model else {}), **labels},
            "annotations": {"summary": "drift share above 0.5"}, "startsAt": "2026-11-30T10:00:00.123Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
            "fingerprint": fingerprint}


def alertmanager(*alerts: dict[str, Any], group_key: str = '{}:{alertname="FeatureDrift"}') -> dict[str, Any]:
    """Alertmanager's documented webhook payload, version 4."""
    return {"version": "4", "groupKey": group_key, "truncatedAlerts": 0,
            "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
            "receiver": "driftloop", "groupLabels": {"alertname": "FeatureDrift"},
            "commonLabels": {"alertname": "FeatureDrift"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "alerts": list(alerts)}


def grafana(*alerts: dict[str, Any]) -> dict[str, Any]:
    """Grafana's documented unified alerting webhook payload."""
    extra = {"values": {"B": 0.71, "C": 1}, "silenceURL": "http://grafana/alerting/silence/new",
             "dashboardURL": "", "panelURL": "", "imageURL": "http://grafana/img.png"}
    return {"receiver": "driftloop", "status": "firing", "orgId": 1, "alerts": [{**a, **extra} for a in alerts],
            "groupLabels": {"alertname": "FeatureDrift"}, "commonLabels": {}, "commonAnnotations": {},
            "externalURL": "http://grafana:3000/", "version": "1", "groupKey": '{}:{alertname="FeatureDrift"}',
            "truncatedAlerts": 0, "title": "[FIRING:1] FeatureDrift", "state": "alerting",
            "message": "**Firing**\nValue: B=0.71"}


def count(route: str, code: int) -> float:
    return REGISTRY.get_sample_value("driftloop_webhook_requests_total", {"route": route, "code": str(code)}) or 0


# --- each format ---------------------------------------------------------------------------------------


def test_alertmanager_delivery_one_request_per_model_resolved_ignored_and_repeat_is_duplicate(hook):
    url, sink = hook
    payload = alertmanager(am_alert("fraud", "aa01"), am_alert("fraud", "aa02", zone="eu"),
                           am_alert("churn", "bb01"), am_alert("fraud", "aa03", status="resolved"))
    before = count("/v1/alerts/alertmanager", 202)
    r = requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10)
    assert r.status_code == 202, r.text
    got = r.json()
    assert [(a["model"], a["status"]) for a in got["alerts"]] == [
        ("fraud", "accepted"), ("fraud", "in_flight"), ("churn", "accepted"), ("fraud", "ignored")]
    assert got["status"] == "accepted" and got["request_ids"] == [q["request_id"] for q in sink.requests]
    assert [q["model"] for q in sink.requests] == ["fraud", "churn"]
    first = sink.requests[0]
    assert first["reason"] == "alertmanager" and first["evidence"]["alert"]["fingerprint"] == "aa01"
    assert first["evidence"]["group_key"] == payload["groupKey"] and first["evidence"]["receiver"] == "driftloop"
    assert count("/v1/alerts/alertmanager", 202) == before + 1

    sink.finish()  # Alertmanager re-sends the same delivery (a timeout on its side): nothing new starts
    again = requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10)
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    assert [a["status"] for a in again.json()["alerts"]] == ["duplicate", "duplicate", "duplicate", "ignored"]
    assert [a["request_id"] for a in again.json()["alerts"]] == [a["request_id"] for a in got["alerts"]]
    assert len(sink.requests) == 2 and again.json()["request_ids"] == []


def test_alertmanager_new_firing_of_the_same_alert_is_a_new_request(hook):
    url, sink = hook
    first = alertmanager(am_alert("fraud", "aa01"))
    assert requests.post(f"{url}/v1/alerts/alertmanager", json=first, headers=BEARER, timeout=10).status_code == 202
    sink.finish()
    later = alertmanager({**am_alert("fraud", "aa01"), "startsAt": "2026-11-30T18:00:00Z"})  # it fired again
    r = requests.post(f"{url}/v1/alerts/alertmanager", json=later, headers=BEARER, timeout=10)
    assert r.status_code == 202 and len(sink.requests) == 2, r.text


def test_resolved_alerts_never_retrain(hook):
    url, sink = hook
    payload = alertmanager(am_alert("fraud", "aa01", status="resolved"), am_alert(None, "zz", status="resolved"))
    r = requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ignored" and r.json()["request_ids"] == [], r.text
    assert sink.requests == []


def test_grafana_delivery_accepted_with_its_extra_fields(hook):
    url, sink = hook
    body = orjson.dumps(grafana(am_alert("churn", "c6eadffa33fcdf37"), am_alert("fraud", "bc97", status="resolved")))
    r = requests.post(f"{url}/v1/alerts/grafana", data=body, headers=BEARER, timeout=10)
    assert r.status_code == 202, r.text
    assert [a["status"] for a in r.json()["alerts"]] == ["accepted", "ignored"]
    (req,) = sink.requests
    assert req["model"] == "churn" and req["reason"] == "grafana" and r.json()["request_ids"] == [req["request_id"]]
    assert req["evidence"]["alert"]["values"] == {"B": 0.71, "C": 1}  # Grafana's fields reach the evidence
    again = requests.post(f"{url}/v1/alerts/grafana", data=body, headers=BEARER, timeout=10)
    assert again.status_code == 200 and again.json()["alerts"][0]["status"] == "duplicate"


def test_generic_alert_with_idempotency_key(hook):
    url, sink = hook
    alert = {"model": "fraud", "reason": "fraud rate doubled", "evidence": {"rate": 0.02}}
    r = requests.post(f"{url}/v1/alerts", json=alert, headers={**BEARER, "Idempotency-Key": "inc-42"}, timeout=10)
    assert r.status_code == 202 and r.json()["status"] == "accepted", r.text
    assert sink.requests[0] | {"request_id": None} == {"request_id": None, "model": "fraud",
                                                      "reason": "fraud rate doubled", "evidence": {"rate": 0.02},
                                                      "key": "key:inc-42"}
    sink.finish()
    again = requests.post(f"{url}/v1/alerts", json={**alert, "idempotency_key": "inc-42"}, headers=BEARER,
                          timeout=10)  # the key in the body is the same key
    assert again.status_code == 200 and again.json() == {"status": "duplicate", "request_id": r.json()["request_id"]}
    keyless = requests.post(f"{url}/v1/alerts", json={"model": "churn"}, headers=BEARER, timeout=10)
    assert keyless.status_code == 202 and sink.requests[-1]["reason"] == "webhook" and sink.requests[-1]["key"] is None
    busy = requests.post(f"{url}/v1/alerts", json={"model": "churn"}, headers=BEARER, timeout=10)
    assert busy.status_code == 200 and busy.json() == {"status": "in_flight",
                                                       "request_id": keyless.json()["request_id"]}


def test_deprecated_alerts_route_takes_model_name(hook):
    url, sink = hook
    r = requests.post(f"{url}/alerts", data=b'{"model_name": "fraud", "source": "grafana"}', timeout=10,
                      headers={**BEARER, "Content-Type": "application/x-www-form-urlencoded"})  # as curl -d sends it
    assert r.status_code == 202 and sink.requests[0]["evidence"] == {"alert": {"model_name": "fraud",
                                                                              "source": "grafana"}}, r.text
    missing = requests.post(f"{url}/alerts", json={"source": "grafana"}, headers=BEARER, timeout=10)
    assert missing.status_code == 422 and "model_name" in missing.json()["error"]


def test_hmac_signed_request_accepted_and_sign_agrees(hook):
    url, sink = hook
    body = orjson.dumps({"model": "churn"})
    ts = int(time.time())
    assert sign(TOKEN, body, ts) == {k: v for k, v in signed(body, ts).items() if k != "Content-Type"}
    r = requests.post(f"{url}/v1/alerts", data=body, headers=signed(body, ts), timeout=10)
    assert r.status_code == 202 and sink.requests[0]["model"] == "churn", r.text


# --- each abuse case -----------------------------------------------------------------------------------


def test_credentials_refused(hook):
    url, sink = hook
    body = orjson.dumps({"model": "churn"})
    now = int(time.time())
    cases = {
        "no credentials": {"Content-Type": "application/json"},
        "wrong token": {"Authorization": "Bearer nope"},
        "not bearer": {"Authorization": f"Basic {TOKEN}"},
        "bad signature": signed(body, now, key="another-secret"),
        "signature of another body": signed(orjson.dumps({"model": "fraud"}), now),
        "stale timestamp": signed(body, now - 120),
        "future timestamp": signed(body, now + 120),
        "no timestamp": {k: v for k, v in signed(body, now).items() if k != "X-Driftloop-Timestamp"},
    }
    before = count("/v1/alerts", 401)
    for what, headers in cases.items():
        r = requests.post(f"{url}/v1/alerts", data=body, headers=headers, timeout=10)
        assert r.status_code == 401 and set(r.json()) == {"error"}, (what, r.status_code, r.text)
        assert TOKEN not in r.text
    assert requests.post(f"{url}/v1/alerts/alertmanager", json={}, timeout=10).status_code == 401
    assert requests.get(f"{url}/no/such/route", timeout=10).status_code == 401  # routes are not revealed
    assert sink.requests == [] and count("/v1/alerts", 401) == before + len(cases)


def test_replayed_signature_refused(hook):
    url, sink = hook
    body = orjson.dumps({"model": "churn", "evidence": {"test": "replay"}})  # a signature no other test sent
    headers = signed(body)
    assert requests.post(f"{url}/v1/alerts", data=body, headers=headers, timeout=10).status_code == 202
    sink.finish()
    replay = requests.post(f"{url}/v1/alerts", data=body, headers=headers, timeout=10)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    assert len(sink.requests) == 1


def test_oversize_bodies_get_413(hook):
    url, sink = hook
    big = b'{"model": "churn", "evidence": {"pad": "' + b"x" * (2 << 20) + b'"}}'
    r = requests.post(f"{url}/v1/alerts", data=big, headers=BEARER, timeout=30)  # Content-Length: 2 MiB
    assert r.status_code == 413 and "1048576" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 64 << 10):
            yield big[i:i + (64 << 10)]

    chunked = requests.post(f"{url}/v1/alerts", data=chunks(), headers=BEARER, timeout=30)
    assert chunked.status_code == 413 and "Content-Length" not in chunked.request.headers
    fits = b'{"model": "churn", "evidence": {"pad": "' + b"x" * ((1 << 20) - 100) + b'"}}'
    assert len(fits) <= 1 << 20
    assert requests.post(f"{url}/v1/alerts", data=fits, headers=BEARER, timeout=30).status_code == 202
    assert len(sink.requests) == 1


def test_malformed_wrong_shape_and_unknown_model(hook):
    url, sink = hook

    def post(route: str, data: bytes) -> requests.Response:
        return requests.post(f"{url}{route}", data=data, headers={**BEARER, "Content-Type": "application/json"},
                             timeout=10)

    for bad in (b"", b"nope", b'{"model": "churn"', b'{"model": NaN}'):
        r = post("/v1/alerts", bad)
        assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON"), (bad, r.text)
    shapes = {"/v1/alerts": [b"[]", b'{"model": 3}', b'{"model_name": "churn"}', b'{"model": "churn", "evidence": 1}'],
              "/v1/alerts/alertmanager": [orjson.dumps({**alertmanager(am_alert("churn", "a")), "version": "3"}),
                                          orjson.dumps({**alertmanager(am_alert("churn", "a")), "alerts": []}),
                                          orjson.dumps(alertmanager({"status": "firing", "labels": {}}))],
              "/v1/alerts/grafana": [orjson.dumps({"status": "firing", "alerts": [{"status": "pending"}]})]}
    for route, bodies in shapes.items():
        for body in bodies:
            r = post(route, body)
            assert r.status_code == 422 and set(r.json()) == {"error"}, (route, body[:80], r.text)
            assert "\n" not in r.json()["error"]
    unlabeled = post("/v1/alerts/alertmanager", orjson.dumps(alertmanager(am_alert("churn", "a"), am_alert(None, "b"))))
    assert unlabeled.status_code == 422 and "alerts[1].labels.model" in unlabeled.json()["error"]
    for route, body in {"/v1/alerts": {"model": "ghost"}, "/alerts": {"model_name": "ghost"},
                        "/v1/alerts/alertmanager": alertmanager(am_alert("churn", "a"), am_alert("ghost", "b")),
                        "/v1/alerts/grafana": grafana(am_alert("ghost", "a"))}.items():
        r = post(route, orjson.dumps(body))
        assert r.status_code == 404 and r.json()["models"] == MODELS, (route, r.text)
        assert "'ghost'" in r.json()["error"] and "churn, fraud" in r.json()["error"]
    assert sink.requests == []  # a refused delivery asks for nothing, not even for its valid alerts


def test_a_refused_request_is_200_with_the_sinks_reason(hook):
    url, sink = hook
    sink.refusal = "over_budget"
    r = requests.post(f"{url}/v1/alerts", json={"model": "fraud"}, headers=BEARER, timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "over_budget", "request_id": None}, r.text
    payload = alertmanager(am_alert("fraud", "aa01"), am_alert("churn", "bb01", status="resolved"))
    d = requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10)
    assert d.status_code == 200 and d.json()["status"] == "over_budget" and d.json()["request_ids"] == [], d.text
    assert [(a["status"], a["request_id"]) for a in d.json()["alerts"]] == [("over_budget", None), ("ignored", None)]
    assert sink.requests == []


def test_broker_not_acknowledging_is_503_then_the_resend_is_accepted(hook):
    url, sink = hook
    payload = alertmanager(am_alert("fraud", "aa01"))
    sink.broker_down = True
    r = requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10)
    assert r.status_code == 503 and "send it again" in r.json()["error"] and sink.requests == []
    sink.broker_down = False
    assert requests.post(f"{url}/v1/alerts/alertmanager", json=payload, headers=BEARER, timeout=10).status_code == 202


def test_rate_limit_per_sender():
    sink = DictSink()
    server = start_server(create_app(sink, WebhookAuth(TOKEN), rate_per_s=1, burst=3), "127.0.0.1", 0)
    try:
        codes = [requests.post(f"{server.url}/v1/alerts", json={"model": "fraud"}, headers=BEARER, timeout=10)
                 for _ in range(5)]  # well within a second, even on a busy machine
        assert [r.status_code for r in codes] == [202, 200, 200, 429, 429]
        assert set(codes[3].json()) == {"error"} and codes[3].headers["Retry-After"] == "1"
        anonymous = [requests.post(f"{server.url}/v1/alerts", json={}, timeout=10).status_code for _ in range(4)]
        assert anonymous == [401, 401, 401, 429]  # failed credentials have a bucket of their own
        time.sleep(float(codes[4].headers["Retry-After"]))
        assert requests.post(f"{server.url}/v1/alerts", json={"model": "fraud"}, headers=BEARER,
                             timeout=10).status_code == 200
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # never limited
    finally:
        server.stop()


def test_docs_health_and_openapi_without_auth(served):
    server, _ = served
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    docs = requests.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v1/alerts/alertmanager", "/v1/alerts/grafana", "/v1/alerts", "/alerts"} <= set(spec["paths"])
    assert spec["paths"]["/alerts"]["post"]["deprecated"] is True
    assert {"HTTPBearer", "APIKeyHeader"} == set(spec["components"]["securitySchemes"])


def test_server_binds_a_free_port_and_stops(served):
    server, _ = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    other = start_server(create_app(DictSink(), WebhookAuth(TOKEN), rate_per_s=1, burst=1), "127.0.0.1", 0)
    assert other.port != server.port
    other.stop()
    assert not other.thread.is_alive()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{other.url}/healthz", timeout=2)


def test_token_from_settings_or_generated_once(tmp_path):
    assert load_or_create_token(Settings(data_dir=tmp_path / "a", webhook_token="given")) == "given"
    s = Settings(data_dir=tmp_path / "b")
    token = load_or_create_token(s)
    path = s.root / "webhook.token"
    assert len(token) >= 40 and path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_token(Settings(data_dir=tmp_path / "b")) == token  # kept, not regenerated
    assert sorted(p.name for p in s.root.iterdir()) == ["webhook.token"]  # no temporary file left
