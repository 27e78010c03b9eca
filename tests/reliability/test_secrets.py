"""Secrets stay secret: a stack runs with a webhook token, an outbound-webhook signing secret, a webhook URL
with credentials in it and (where redis-server is installed) a Redis online store behind a password. After
traffic, alerts and signed deliveries, none of them appears in the logs, ``stack.json``, the drift reports,
the loop pages, any worker's metrics or any record on driftloop's topics."""

from __future__ import annotations

import contextlib
import json
import shutil
from typing import Any

import pytest
import requests

from driftloop.app.producer import load_generator, produce
from driftloop.app.supervisor import start_detached, stop_stack
from driftloop.bench.serving import read_all
from driftloop.core.contracts import TOPICS
from driftloop.core.settings import Settings
from tests.helpers import wait_for
from tests.servers import redis_server
from tests.test_drift_worker import Receiver, alertmanager, sign

pytestmark = pytest.mark.reliability

TOKEN = "tok-" + "Q7" * 16
NOTIFY_SECRET = "sig-" + "K9" * 16
URL_PASSWORD = "urlpw-" + "Z3" * 10
REDIS_PASSWORD = "redispw-" + "M5" * 10


def _everything(s: Settings, info: dict[str, Any]) -> dict[str, str]:
    """Every place a secret must not appear: name → text."""
    out = {str(p): p.read_text(errors="replace") for p in s.root.rglob("*")
           if p.is_file() and (p.suffix in (".log", ".html", ".json", ".txt") or "logs" in p.parts)
           and p.name != "declarations.json" and p.stat().st_size < 50_000_000}
    out["stack.json"] = s.stack_file.read_text()
    base = info["webhook_url"].removesuffix("/v1/alerts")
    for path in ("/models", "/models/ctr", "/api/models/ctr", "/docs", "/openapi.json", "/healthz"):
        out[f"GET {path}"] = requests.get(base + path, timeout=10).text
    for name, port in info["metrics_ports"].items():
        out[f"metrics {name}"] = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for topic in TOPICS:
        for m in read_all(s, topic, 10**6, timeout=0, idle_s=0.5):
            out.setdefault(f"topic {topic}", "")
            out[f"topic {topic}"] += (m.value() or b"").decode(errors="replace") + json.dumps(
                [(k, v.decode(errors="replace")) for k, v in (m.headers() or [])])
    return out


def test_no_secret_in_logs_files_pages_metrics_or_topics(settings: Settings, figure) -> None:
    hook = Receiver(fail=0)
    notify = hook.url.replace("http://", f"http://user:{URL_PASSWORD}@")
    secrets = {"webhook token": TOKEN, "notify secret": NOTIFY_SECRET, "URL password": URL_PASSWORD}
    with contextlib.ExitStack() as stack:
        update: dict[str, Any] = {"webhook_token": TOKEN, "notify_secret": NOTIFY_SECRET, "notify_urls": [notify]}
        if shutil.which("redis-server"):
            update["redis_url"] = stack.enter_context(redis_server(password=REDIS_PASSWORD))
            secrets["Redis password"] = REDIS_PASSWORD
        s = settings.model_copy(update=update)
        info = start_detached(s, timeout=300)
        stack.callback(stop_stack, s)
        produce(s, [load_generator(s, "ctr", seed=3)], rate=300, duration=15, progress=False)
        base = info["webhook_url"]
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        got = requests.post(f"{base}/alertmanager", json=alertmanager(model="ctr"), headers=bearer, timeout=10)
        assert got.status_code == 202, got.text
        body = json.dumps({"model": "ctr", "reason": "signed"}).encode()
        assert requests.post(base, data=body, headers=sign(body, secret=TOKEN), timeout=10).status_code in (200, 202)
        assert requests.post(base, json={"model": "ctr"}, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                             timeout=10).status_code == 401  # a near miss is logged: it must not echo the token
        wait_for(lambda: hook.got, 60)  # a signed outbound delivery went out
        texts = _everything(s, info)
    hook.shutdown()
    leaks = [(name, what) for name, text in texts.items() for what, secret in secrets.items() if secret in text]
    assert not leaks, f"secrets found: {leaks}"
    assert len(texts) > 10 and any(n.startswith("topic ") for n in texts) and any(n.endswith(".log") for n in texts)
    figure("secrets: places searched", len(texts), "places", secrets=len(secrets))
    figure("secrets: leaks", len(leaks), "leaks")
