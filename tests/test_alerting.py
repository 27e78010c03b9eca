"""The real alerting path: the drift worker's metrics → Prometheus (the repo's rules) → Alertmanager (the repo's
config) → the drift worker's webhook → exactly one retrain request, however often Alertmanager re-sends.

Debian's ``prometheus`` and ``prometheus-alertmanager`` run on loopback ports in the test's folder. A declared
model's realised performance is made to drop far beyond its tolerance by publishing its predictions, then
labels that agree with the scores (the version's live baseline), then labels that contradict them.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from driftloop.core.broker import free_port
from driftloop.core.contracts import DriftReport, Label, RetrainRequest
from driftloop.core.settings import Settings
from driftloop.drift.auth import load_or_create_token, token_path
from driftloop.registry.versions import register_version
from tests.helpers import apply_repo, child, read_all, wait_for, worker
from tests.test_drift_worker import everything, publish, reference, windows
from tests.test_retrain import FEATURES, items_repo
from tests.test_slo_config import ALERTMANAGER, RULES

PROMETHEUS_BIN = shutil.which("prometheus")
ALERTMANAGER_BIN = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(
    PROMETHEUS_BIN is None or ALERTMANAGER_BIN is None,
    reason="needs Debian's prometheus and prometheus-alertmanager packages (.ci/run installs them); missing: "
           + ", ".join(n for n, b in (("prometheus", PROMETHEUS_BIN), ("prometheus-alertmanager", ALERTMANAGER_BIN))
                       if b is None))

MODEL = "m_custom"  # binary, metric auc (tests/test_retrain.py's repo)
ALERT = "DriftloopModelPerformanceDrop"
ROUTE = "/v1/alerts/alertmanager"
BATCH = 400  # predictions per drift window
# persist_windows 2: the test stops at the first breached window, so the monitor never starts an episode (and
# never asks on its own evidence); the one request must come through Alertmanager.
OVERRIDES = {MODEL: {"drift_window": BATCH, "drift_window_s": None, "drift_min_rows": 100,
                     "drift_persist_windows": 2, "performance_tolerance": 0.1,
                     "drift_methods": dict.fromkeys([*FEATURES, "score"], "ks")}}  # calibrated on small windows


# --- processes ------------------------------------------------------------------------------------

def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def service(argv: list[str], log_file: Path, ready_url: str, timeout: float = 60):
    """A server process, once ``ready_url`` answers 200; stopped (SIGTERM, then SIGKILL) on exit."""
    return child(argv, log_file, lambda: answers(ready_url), timeout, grace=15)


def prometheus_config(tmp: Path, metrics_port: int, alertmanager_port: int) -> Path:
    """Prometheus scraping the drift worker every second, evaluating the repo's rules every second.

    The rules are the repo's, except every ``for:`` is shortened to 2 s: production holds a model alert for
    minutes (a worker restart or one odd scrape must not retrain), which a test cannot wait for. The
    pending → firing transition is still exercised."""
    text, n = re.subn(r"(?m)^(\s+)for: \S+$", r"\1for: 2s", RULES.read_text())
    assert n >= 1
    rules = tmp / "rules.yml"
    rules.write_text(text)
    cfg = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
           "rule_files": [str(rules)],
           "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
           "scrape_configs": [{"job_name": "driftloop", "static_configs": [
               {"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def alertmanager_config(tmp: Path, s: Settings) -> Path:
    """The repo's Alertmanager config, sending to this worker's webhook with its token file, re-sending a firing
    group every 2 s (so the webhook sees duplicates)."""
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    (hook,) = next(r for r in cfg["receivers"] if r["name"] == "driftloop")["webhook_configs"]
    hook["url"] = f"http://127.0.0.1:{s.webhook_port}{ROUTE}"
    hook["http_config"]["authorization"]["credentials_file"] = str(token_path(s))
    for route in (cfg["route"], *cfg["route"].get("routes", [])):
        route.update(group_wait="1s", group_interval="1s", repeat_interval="2s")
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- reading what happened ------------------------------------------------------------------------------

def samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample ``name`` on a worker's /metrics (parsed by prometheus_client)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


def webhook_codes(port: int) -> dict[str, float]:
    """Responses of the Alertmanager route so far, by status code."""
    return {lab["code"]: v for lab, v in samples(port, "driftloop_webhook_requests_total") if lab["route"] == ROUTE}


def reports(s: Settings) -> list[DriftReport]:
    return [r for m in everything(s, "drift.reports") if (r := DriftReport.from_bytes(m.value())).model_name == MODEL]


def prometheus_alerts(port: int) -> list[dict[str, Any]]:
    return requests.get(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5).json()["data"]["alerts"]


def alertmanager_alerts(port: int) -> list[dict[str, Any]]:
    return requests.get(f"http://127.0.0.1:{port}/api/v2/alerts", timeout=5).json()


def until(cond: Callable[[], Any], timeout: float, explain: Callable[[], object]) -> Any:
    """``wait_for``, failing with ``explain()`` (what the servers hold) instead of a bare timeout."""
    try:
        return wait_for(cond, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}: {explain()}") from None


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path} missing)"


def ours(labels: dict[str, str]) -> bool:
    return labels.get("alertname") == ALERT and labels.get("model") == MODEL and labels.get("kind") == "realised"


# --- the test --------------------------------------------------------------------------------------

@pytest.fixture
def als(tmp_path, bootstrap_servers) -> Settings:
    s = Settings(data_dir=tmp_path / "data", repo=items_repo(tmp_path), bootstrap_servers=bootstrap_servers,
                 partitions=2, topic_prefix=f"a{uuid.uuid4().hex[:8]}.", metrics_port=free_port(),
                 webhook_port=free_port(), model_overrides=OVERRIDES)
    apply_repo(s)
    return s


def test_a_performance_drop_fires_through_alertmanager_into_one_retrain(als: Settings, tmp_path):
    s = als
    load_or_create_token(s)  # the worker's token file, which Alertmanager's credentials_file points at
    rng = np.random.default_rng(7)
    prom_port, am_port = free_port(), free_port()
    prom = [PROMETHEUS_BIN, f"--config.file={prometheus_config(tmp_path, s.metrics_port, am_port)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"]
    am = [ALERTMANAGER_BIN, f"--config.file={alertmanager_config(tmp_path, s)}",
          f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
          "--cluster.listen-address="]  # no gossip: a single instance
    t0 = int(time.time() * 1e6)
    rounds = iter(range(1, 100))

    def window(labels: str) -> DriftReport:
        """One window of predictions (it closes with the last one), then labels for it: drawn from the scores
        ("agree") or against them ("contradict"). The report is of the window, with the labels published
        before it (labels and predictions are separate topics: a window may miss the last labels)."""
        i, before = next(rounds), len(reports(s))
        batch = windows(rng, MODEL, version, [0], t0 + i * 10**9)[:BATCH]
        publish(s, "predictions", batch)
        rep = wait_for(lambda: (got := reports(s)) and len(got) > before and got[-1], 90)
        score = np.array([p.score for p in batch])
        y = rng.random(len(score)) < score if labels == "agree" else rng.random(len(score)) > score
        publish(s, "labels", [Label(model_name=MODEL, key=p.key, label=float(v), event_id=p.event_id, ts=p.ts)
                              for p, v in zip(batch, y, strict=True)])
        return rep

    from my_trainer import Logistic  # the repo is on sys.path after apply

    with ThreadPoolExecutor(1) as pool:  # the champion is registered while the processes start
        champion = pool.submit(register_version, s, MODEL, Logistic(3), FEATURES, reference(rng), onnx_bytes=None,
                               challenger=False, metrics={"holdout_auc": 0.8})
        with worker(s, "drift"), service(am, tmp_path / "alertmanager.log", f"http://127.0.0.1:{am_port}/-/ready"), \
                service(prom, tmp_path / "prometheus.log", f"http://127.0.0.1:{prom_port}/-/ready"):
            version, _ = champion.result()
            # the version's live baseline: its first two realised AUCs, from labels that agree with the scores
            seen = [window("agree")]
            while sum("realised" in r.performance for r in seen) < 2:
                assert len(seen) < 10, [r.performance for r in seen]
                seen.append(window("agree"))
            # labels against the scores: the realised AUC falls far below the baseline
            while "realised" not in seen[-1].reasons:
                assert len(seen) < 20, [(r.reasons, r.performance) for r in seen]
                seen.append(window("contradict"))
            breach = seen[-1].performance
            drop = (breach["realised_reference"] - breach["realised"]) / breach["realised_reference"]
            assert drop > 0.1 and not any(r.breached for r in seen[:-1])

            fired = until(lambda: [a for a in prometheus_alerts(prom_port) if ours(a["labels"])
                                   and a["state"] == "firing"], 60,
                          lambda: (prometheus_alerts(prom_port), tail(tmp_path / "prometheus.log"),
                                   samples(s.metrics_port, "driftloop_model_performance_drop")))
            assert float(fired[0]["value"]) == pytest.approx(drop)  # the gauge says what the report says
            assert fired[0]["labels"]["severity"] == "ticket"
            assert fired[0]["annotations"]["runbook_url"].endswith("/docs/runbooks/performance-drop.md")
            rules = requests.get(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5).json()["data"]["groups"]
            assert [(r["name"], r["health"]) for g in rules for r in g["rules"] if r["health"] != "ok"] == []
            routed = until(lambda: [a for a in alertmanager_alerts(am_port) if ours(a["labels"])], 30,
                           lambda: (alertmanager_alerts(am_port), tail(tmp_path / "alertmanager.log")))
            assert routed[0]["status"]["state"] == "active"
            assert [r["name"] for r in routed[0]["receivers"]] == ["driftloop"]
            # the first delivery is accepted (202); Alertmanager re-sends the group every 2 s: duplicates (200)
            codes = until(lambda: (c := webhook_codes(s.metrics_port)).get("202", 0) >= 1 and c.get("200", 0) >= 1
                          and c, 60, lambda: (webhook_codes(s.metrics_port), tail(tmp_path / "alertmanager.log"),
                                              tail(s.root / "drift.log")))
            assert set(codes) == {"202", "200"} and codes["202"] == 1, codes  # every delivery authenticated
            assert not [a for a in prometheus_alerts(prom_port) if a["labels"].get("alertname") == ALERT
                        and a["labels"].get("model") != MODEL]

    asked = [RetrainRequest.from_bytes(m.value()) for m in read_all(s, "retrain.requests")]
    assert [r.model_name for r in asked] == [MODEL], [(r.model_name, r.reason) for r in asked]
    ev = asked[0].evidence
    assert asked[0].reason == "webhook" and ev["source"] == "alertmanager" and ev["receiver"] == "driftloop"
    assert ev["alert"]["labels"]["alertname"] == ALERT and ev["alert"]["labels"]["model"] == MODEL
