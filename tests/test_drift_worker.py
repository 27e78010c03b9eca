"""The drift worker as users run it (``driftloop worker drift``), over a real broker and real HTTP.

Two models are scored; only one drifts. The drifting one gets exactly one retraining request per drift
episode (carrying its evidence), even once its first request's outcome frees it to ask again; the other
gets none. Its alert webhook takes each format and refuses each abuse with the documented status.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
import requests
from scipy.stats import mannwhitneyu

from driftloop.bench.serving import read_all
from driftloop.core.broker import free_port
from driftloop.core.contracts import DriftReport, Label, ModelRejected, Prediction, RetrainRequest
from driftloop.core.kafka import Deliveries, make_producer
from driftloop.core.settings import Settings
from driftloop.registry.versions import register_version
from tests.helpers import apply_repo, wait_for, worker
from tests.test_retrain import FEATURES, items_repo

WINDOW = 1500  # above 1000: the default methods (Wasserstein, Jensen-Shannon)
TOKEN = "test-token-" + "x" * 20
OVERRIDES = {name: {"drift_window": WINDOW, "drift_window_s": None, "drift_persist_windows": 2,
                    "drift_recover_windows": 2, "retrain_cooldown_s": 0, "retrain_budget_per_day": 10}
             for name in ("m_bin", "m_reg", "m_mc", "m_custom")}


@pytest.fixture(scope="module")
def ds(tmp_path_factory, bootstrap_servers) -> Settings:
    root = tmp_path_factory.mktemp("driftw")
    s = Settings(data_dir=root / "data", repo=items_repo(root), bootstrap_servers=bootstrap_servers, partitions=2,
                 topic_prefix=f"d{uuid.uuid4().hex[:8]}.", webhook_token=TOKEN, webhook_port=free_port(),
                 model_overrides=OVERRIDES, webhook_rate_per_s=50, webhook_burst=50)
    apply_repo(s)
    return s


def scores(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(x @ np.array([0.8, -0.5, 0.3]))))


def reference(rng: np.random.Generator, n: int = 5000) -> pd.DataFrame:
    x = rng.normal(size=(n, len(FEATURES)))
    return pd.DataFrame(x, columns=FEATURES).assign(score=scores(x))


def windows(rng: np.random.Generator, name: str, version: str, shifts: list[float], t0: int) -> list[Prediction]:
    """One window of predictions per shift, event times 10 ms apart."""
    out = []
    for w, shift in enumerate(shifts):
        x = rng.normal(size=(WINDOW, len(FEATURES))) + shift
        score = scores(x)
        for i in range(WINDOW):
            out.append(Prediction(key=f"k{i % 50}", model_name=name, model_version=version, score=float(score[i]),
                                  features=dict(zip(FEATURES, map(float, x[i]), strict=True)), latency_s=0.01,
                                  ts=t0 + (w * WINDOW + i) * 10_000))
    return out


def publish(s: Settings, topic: str, events: list, key: str = "model_name") -> None:
    """Keyed by model: each model's predictions in order on one partition (windows follow event time)."""
    out = Deliveries(make_producer(s))
    for ev in events:
        out.event(s, topic, ev, getattr(ev, key))
    out.wait(60)


def everything(s: Settings, topic: str) -> list:
    """Every record of a topic so far."""
    return read_all(s, topic, 10**9, timeout=0, idle_s=1)


def reports_of(s: Settings, name: str, n: int) -> list[DriftReport]:
    return wait_for(lambda: (got := [r for m in everything(s, "drift.reports")
                                     if (r := DriftReport.from_bytes(m.value())).model_name == name]) and
                    len(got) >= n and got, 30)


class Receiver(ThreadingHTTPServer):
    """An outbound-webhook receiver that answers 500 to its first ``fail`` deliveries."""

    def __init__(self, fail: int = 2):
        self.fail, self.got = fail, []  # (status answered, headers, body)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 500 if receiver.fail > 0 else 200
                receiver.fail -= 1
                receiver.got.append((code, dict(self.headers), body))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def test_one_request_per_episode_and_only_for_the_drifting_model(ds: Settings):
    receiver = Receiver(fail=2)
    ds = Settings(**{**ds.model_dump(), "notify_urls": [receiver.url]})
    rng = np.random.default_rng(11)
    versions = {}
    for name in ("m_bin", "m_reg"):
        from my_trainer import Logistic  # the repo is on sys.path after apply

        versions[name], _ = register_version(ds, name, Logistic(3), FEATURES, reference(rng), onnx_bytes=None,
                                             challenger=False)
    t0 = int(time.time() * 1e6) - 3_600_000_000
    # m_bin: calm, calm, then drifted x3 (episode 1 starts at the 2nd), calm x2 (ends), drifted x2 (episode 2)
    bin_shifts = [0, 0, 2, 2, 2, 0, 0, 2, 2]
    with worker(ds, "drift"):
        publish(ds, "predictions", windows(rng, "m_bin", versions["m_bin"], bin_shifts[:5], t0)
                + windows(rng, "m_reg", versions["m_reg"], [0] * 5, t0))

        def requests_now() -> list[RetrainRequest]:
            return [RetrainRequest.from_bytes(m.value()) for m in everything(ds, "retrain.requests")]

        first = wait_for(lambda: [r for r in requests_now() if r.reason == "drift"], 60)
        assert len(first) == 1 and first[0].model_name == "m_bin"
        ev = first[0].evidence
        assert ev["episode_id"] and len(ev["windows"]) == 2 and ev["columns"] and "estimated" in ev["performance"]
        # the outcome frees the model; the same episode still asks nothing more
        publish(ds, "models.rejected", [ModelRejected(model_name="m_bin", version=None, run_id=None,
                                                      checks={"gate": "test"}, request_id=first[0].request_id)])
        time.sleep(2)
        publish(ds, "predictions", windows(rng, "m_bin", versions["m_bin"], bin_shifts[5:], t0 + 10**10))
        wait_for(lambda: len([r for r in requests_now() if r.reason == "drift"]) >= 2, 60)
        time.sleep(2)
        drift_reqs = [r for r in requests_now() if r.reason == "drift"]
        bin_reports = reports_of(ds, "m_bin", len(bin_shifts))
        html = [r.report_url[len("file://"):] for r in bin_reports if r.breached]
        wait_for(lambda: all(os.path.exists(f) for f in html), 120)  # written off the monitor's loop
    assert [r.model_name for r in drift_reqs] == ["m_bin", "m_bin"]
    assert drift_reqs[0].evidence["episode_id"] != drift_reqs[1].evidence["episode_id"]
    assert [r.episode for r in bin_reports] == ["none", "none", "none", "started", "ongoing", "ongoing", "ended",
                                               "none", "started"]
    assert [r.drifted for r in bin_reports] == [s > 0 for s in bin_shifts]
    reg_reports = reports_of(ds, "m_reg", 5)
    assert len(reg_reports) == 5 and not any(r.breached for r in reg_reports)
    # outbound webhooks: the receiver failed twice, then got every event once, signed
    ok = wait_for(lambda: [(h, b) for c, h, b in receiver.got if c == 200] or None, 30)
    receiver.shutdown()
    events = [json.loads(b)["event"] for _, b in ok]
    assert events.count("drift.detected") == 2 and events.count("retrain.requested") == 2, events
    assert "model.rejected" in events and len(receiver.got) == len(ok) + 2
    assert len({h["X-Driftloop-Delivery"] for h, _ in ok}) == len(ok)
    assert all(sign(b, int(h["X-Driftloop-Timestamp"]))["X-Driftloop-Signature"] == h["X-Driftloop-Signature"]
               for h, b in ok)
    assert len(html) == 5 and all("<html" in open(f).read(4096).lower() for f in html)


# --- the alert webhook of the running worker ----------------------------------------------------------

def sign(body: bytes, ts: int | None = None, secret: str = TOKEN) -> dict[str, str]:
    """Independent of drift/auth.py: HMAC-SHA256 over "<ts>." + body."""
    ts = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Driftloop-Timestamp": str(ts), "X-Driftloop-Signature": f"sha256={mac}",
            "Content-Type": "application/json"}


def alertmanager(status: str = "firing", model: str = "m_reg", fingerprint: str = "f1") -> dict:
    alert = {"status": status, "labels": {"alertname": "Drift", "model": model}, "annotations": {},
             "startsAt": "2026-11-30T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom",
             "fingerprint": fingerprint}
    return {"version": "4", "groupKey": "{}:{alertname=\"Drift\"}", "truncatedAlerts": 0, "status": status,
            "receiver": "driftloop", "groupLabels": {"alertname": "Drift"}, "commonLabels": alert["labels"],
            "commonAnnotations": {}, "externalURL": "http://am", "alerts": [alert]}


def test_webhook_formats_and_abuse(ds: Settings):
    base = f"http://127.0.0.1:{ds.webhook_port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with worker(ds, "drift", log_name="drift-webhook"):
        am = f"{base}/v1/alerts/alertmanager"
        assert requests.post(am, json=alertmanager(), timeout=10).status_code == 401  # no auth
        assert requests.post(am, json=alertmanager(), headers={"Authorization": "Bearer nope"},
                             timeout=10).status_code == 401
        ok = requests.post(am, json=alertmanager(), headers=bearer, timeout=10)
        assert ok.status_code == 202, ok.text
        again = requests.post(am, json=alertmanager(), headers=bearer, timeout=10)  # Alertmanager re-sends
        assert again.status_code == 200 and "duplicate" in again.text
        resolved = requests.post(am, json=alertmanager("resolved", fingerprint="f2"), headers=bearer, timeout=10)
        assert resolved.status_code == 200 and resolved.json()["request_ids"] == [], resolved.text  # never retrains
        unknown = requests.post(am, json=alertmanager(model="ghost", fingerprint="f3"), headers=bearer, timeout=10)
        assert unknown.status_code == 404 and "m_bin" in unknown.text
        graf = {**alertmanager(model="m_custom", fingerprint="g1"), "orgId": 1, "state": "alerting",
                "title": "[FIRING:1] Drift", "message": "drift"}
        g = requests.post(f"{base}/v1/alerts/grafana", json=graf, headers=bearer, timeout=10)
        assert g.status_code == 202, g.text
        gen = f"{base}/v1/alerts"
        body = json.dumps({"model": "m_mc", "reason": "grafana panel", "evidence": {"panel": 3}}).encode()
        signed = requests.post(gen, data=body, headers=sign(body), timeout=10)
        assert signed.status_code == 202, signed.text
        assert requests.post(gen, data=body, headers=sign(body), timeout=10).status_code in (200, 401)  # replay
        assert requests.post(gen, data=body, headers=sign(body, int(time.time()) - 3600),
                             timeout=10).status_code == 401  # stale
        assert requests.post(gen, data=body, headers=sign(body, secret="wrong"), timeout=10).status_code == 401
        assert requests.post(gen, data=b"{nope", headers={**bearer, "Content-Type": "application/json"},
                             timeout=10).status_code == 400
        assert requests.post(gen, json={"modle": "m_mc"}, headers=bearer, timeout=10).status_code == 422
        big = b'{"model": "m_mc", "evidence": {"x": "' + b"a" * (1 << 20) + b'"}}'
        assert requests.post(gen, data=big, headers={**bearer, "Content-Type": "application/json"},
                             timeout=10).status_code == 413
        assert requests.get(f"{base}/docs", timeout=10).status_code == 200
    reqs = [RetrainRequest.from_bytes(m.value()) for m in everything(ds, "retrain.requests")]
    hooks = [(r.model_name, r.reason) for r in reqs if r.reason == "webhook"]
    assert hooks == [("m_reg", "webhook"), ("m_custom", "webhook"), ("m_mc", "webhook")]


# --- performance before and after labels, windows by time (the monitor in-process) --------------------

def test_realised_drop_breaches_and_time_closes_windows(ds: Settings):
    """Labels that disagree with the scores drop the realised AUC below the version's first live AUCs: a
    breach of its own ("realised") while the features and the label-free estimate hold; a quiet model's
    window closes by event time."""
    from my_trainer import Logistic

    from driftloop.drift.monitor import Monitor
    from driftloop.features.repo import declarations

    rng = np.random.default_rng(3)
    version, _ = register_version(ds, "m_custom", Logistic(3), FEATURES, reference(rng), onnx_bytes=None,
                                  challenger=False, metrics={"holdout_auc": 0.8})
    decls = declarations(ds)
    spec = decls.models["m_custom"].model_copy(update={
        "drift_window": 400, "drift_min_rows": 100, "drift_window_s": 30.0,
        "drift_methods": dict.fromkeys([*FEATURES, "score"], "ks")})  # tests stay calibrated on small windows
    mon = Monitor(ds, decls.model_copy(update={"models": {"m_custom": spec}}))
    t0 = int(time.time() * 1e6)
    batches = [windows(rng, "m_custom", version, [0], t0 + i * 10**9)[:400] for i in range(3)]
    reps, truth = [], []
    for i, batch in enumerate(batches):
        reps.append([mon.add(p) for p in batch][-1])  # closed by count
        s = np.array([p.score for p in batch])
        y = (rng.random(len(s)) < s) if i < 2 else (rng.random(len(s)) > s)  # calibrated, then against
        truth.append((s, y.astype(float)))
        for p, yi in zip(batch, y, strict=True):
            mon.add_label(Label(model_name="m_custom", key=p.key, label=float(yi), event_id=p.event_id, ts=p.ts))
    assert all(r is not None and not r.breached for r in reps)
    last = windows(rng, "m_custom", version, [0], t0 + 4 * 10**9)[:150]  # 150 predictions ...
    assert all(mon.add(p) is None for p in last)
    late = Prediction(key="k", model_name="m_custom", model_version=version, score=0.5, latency_s=0,
                      features=dict.fromkeys(FEATURES, 0.0), ts=last[-1].ts + 31_000_000)
    rep = mon.add(late)  # ... then one 31 s later: the window closed by time, with 150 rows
    mon.close()
    assert rep is not None and rep.rows == 150
    assert rep.reasons == ["realised"], rep.columns

    def auc(s: np.ndarray, y: np.ndarray) -> float:  # independently of the code under test
        return mannwhitneyu(s[y == 1], s[y == 0]).statistic / ((y == 1).sum() * (y == 0).sum())

    perf = rep.performance
    assert perf["realised"] == pytest.approx(auc(*truth[2])) and perf["realised"] < 0.4
    assert perf["realised_reference"] == pytest.approx((auc(*truth[0]) + auc(*truth[1])) / 2)
    assert perf["realised_holdout"] == pytest.approx(0.8) and perf["realised_rows"] == 400
    assert abs(perf["estimated"] - perf["estimated_reference"]) < 0.05


def test_a_hot_swap_moves_the_windows_once(ds: Settings, tmp_path):
    """During a swap both versions' predictions interleave across partitions: the windows follow the new
    version once it arrived 20 times, and stragglers of the old one neither flip them back nor linger."""
    from driftloop.drift.monitor import SWITCH_AFTER, Monitor
    from driftloop.features.repo import declarations

    mon = Monitor(Settings(**{**ds.model_dump(), "data_dir": tmp_path}), declarations(ds))

    def pred(version: str) -> Prediction:
        return Prediction(key="k", model_name="m_reg", model_version=version, score=0.5, latency_s=0,
                          features=dict.fromkeys(FEATURES, 0.0))

    for _ in range(100):
        mon.add(pred("1"))
    st = mon.states["m_reg"]
    for _ in range(10):
        mon.add(pred("2"))
        mon.add(pred("1"))
    assert st.version == "1" and len(st.window.rows) == 110 and len(st.incoming.rows) == 10
    for _ in range(SWITCH_AFTER - 10):
        mon.add(pred("2"))
    assert st.version == "2" and len(st.window.rows) == SWITCH_AFTER and not st.incoming.rows
    for _ in range(5):
        mon.add(pred("1"))  # stragglers
    for _ in range(SWITCH_AFTER + 1):
        mon.add(pred("2"))
    assert st.version == "2" and len(st.window.rows) == 2 * SWITCH_AFTER + 1 and not st.incoming.rows
    mon.close()
