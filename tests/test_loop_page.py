"""The drift worker's live loop page (``drift/page.py``), served by a real ``driftloop worker drift`` process over
the real broker, state database and MLflow store.

The four-model repo of ``test_retrain`` is applied; ``m_reg`` gets a champion, two drifted windows of
predictions (an episode starts and asks for a retrain) and a retrain request in the controller's store. The
JSON is checked against what the monitor published on ``drift.reports`` and what the test did; a headless
Chromium (Debian's ``chromium`` + ``chromedriver``, driven by selenium) keeps the page open while the test
promotes a new champion through ``driftloop promote``'s code path, and the page shows it without a reload.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from driftloop.core.broker import free_port
from driftloop.core.contracts import DriftReport, Prediction, RetrainRequest
from driftloop.core.kafka import Deliveries, make_producer
from driftloop.core.requests import RequestStore
from driftloop.core.settings import Settings
from driftloop.features.repo import declarations
from driftloop.registry.versions import client, register_version
from driftloop.retrain.evaluation import promote_checked
from driftloop.retrain.trainers import outputs, to_onnx
from tests.helpers import read_all, wait_for, worker
from tests.test_retrain import FEATURES, _champion, items_settings

TOKEN = "loop-page-token-" + "z" * 16
WINDOW = 200
MODELS = ["m_bin", "m_custom", "m_flaky", "m_mc", "m_reg"]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Loop:
    """The running worker's base URL and the versions the test registered."""

    def __init__(self, s: Settings, base: str, v1: str, v2: str):
        self.s, self.base, self.v1, self.v2 = s, base, v1, v2

    def api(self, name: str = "m_reg") -> dict[str, Any]:
        r = requests.get(f"{self.base}/api/models/{name}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()


def _predictions(rng: np.random.Generator, version: str, shift: float, n: int, t0: int) -> list[Prediction]:
    x = rng.normal(size=(n, len(FEATURES))) + shift
    return [Prediction(key=f"i{i % 20}", model_name="m_reg", model_version=version, score=float(x[i, 0] + 10.0),
                       features=dict(zip(FEATURES, map(float, x[i]), strict=True)), latency_s=0.001,
                       ts=t0 + i * 10_000) for i in range(n)]


def _register(s: Settings, model: Any) -> str:
    """A new version of m_reg (the challenger), with its ONNX copy and a reference sample."""
    x = np.random.default_rng(1).normal(size=(50, len(FEATURES))).astype(np.float32)
    ref = pd.DataFrame(x, columns=FEATURES).assign(score=outputs(model, x, 1))
    return register_version(s, "m_reg", model, FEATURES, ref, onnx_bytes=to_onnx(model, 3), task="regression")[0]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, bootstrap_servers) -> Iterator[Loop]:
    """The drift worker serving m_reg's page: champion v1 (promoted by the controller's code path), two drifted
    windows (an episode and its request), and v2 registered (the challenger, better than v1)."""
    small = {"drift_window": WINDOW, "drift_window_s": None, "drift_persist_windows": 2, "retrain_cooldown_s": 0}
    s = items_settings(tmp_path_factory.mktemp("loop"), bootstrap_servers, webhook_port=free_port(),
                       webhook_token=TOKEN, model_overrides={"m_reg": small})
    from my_trainer import Fixed  # the repo's module (on the path once applied)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_champion, s, "m_reg", Fixed([1.0, 0.0, 0.0], 10.0), FEATURES)  # while the worker starts
        with worker(s, "drift", log_name="drift-loop-page"):
            v1 = first.result()
            out = Deliveries(make_producer(s))
            for p in _predictions(np.random.default_rng(3), v1, 3.0, 2 * WINDOW, int(time.time() * 1e6)):
                out.event(s, "predictions", p, p.model_name)
            out.wait(60)
            v2 = _register(s, Fixed([3.0, -2.0, 0.0], 10.0))  # the labels' true function: it passes the gate
            lp = Loop(s, f"http://127.0.0.1:{s.webhook_port}", v1, v2)
            wait_for(lambda: len(lp.api()["windows"] or []) == 2 and lp.api()["episode"]["request_id"], 60)
            yield lp


def test_loop_api_and_404(loop: Loop):
    s = loop.s
    published = [r for m in read_all(s, "drift.reports") if (r := DriftReport.from_bytes(m.value())).model_name
                 == "m_reg"]
    d = loop.api()
    assert len(published) == 2
    assert [(w["id"], w["version"], w["rows"], w["drift_share"], w["breached"], w["reasons"], w["episode"],
             w["start_ts"], w["end_ts"]) for w in d["windows"]] == [  # newest first, as the monitor published them
        (r.event_id, r.model_version, r.rows, r.drift_share, r.breached, r.reasons, r.episode, r.window_start_ts,
         r.window_end_ts) for r in reversed(published)]
    assert all(w["rows"] == WINDOW and w["breached"] and "drift" in w["reasons"] for w in d["windows"])
    ep = d["episode"]
    assert ep["active"] and ep["id"] == published[1].episode_id and ep["windows_follow"] == loop.v1
    assert [w["report_id"] for w in ep["windows"]] == [r.event_id for r in published]
    run_id = client(s).get_model_version("m_reg", loop.v1).run_id
    assert d["champion"]["version"] == loop.v1 and d["champion"]["run_id"] == run_id
    assert d["champion"]["run_url"] is None and d["mlflow_ui"] is None  # sqlite store: the run id only
    assert d["challenger"]["version"] == loop.v2
    assert [(m["alias"], m["from_version"], m["to_version"], m["reason"]) for m in d["moves"]] == [
        ("champion", None, loop.v1, "test")]
    assert [(r["request_id"], r["reason"], r["state"]) for r in d["requests"]] == [
        (ep["request_id"], "drift", "sent")]  # sent by the monitor; no retrain worker picked it up
    assert d["errors"] == {}

    # a request the controller gated and rejected: its state, transitions and gate decision
    store = RequestStore(s)
    req = RetrainRequest(model_name="m_reg", reason="webhook",
                         evidence={"alert": {"labels": {"alertname": "DriftloopModelPerformanceDrop"}}})
    store.add(req)
    for state in ("data", "training"):
        store.move(req.request_id, state)
    failed = {"metric": "rmse 2.1 > 1.9"}
    store.move(req.request_id, "evaluating", {"decision": "reject", "gate": "failed: metric: rmse 2.1 > 1.9"},
               version=loop.v1, run_id=run_id, checks=failed)
    store.move(req.request_id, "rejected", {"checks": failed}, checks=failed)
    got = wait_for(lambda: (r := loop.api()["requests"]) and len(r) == 2 and r, 10)
    mine = next(r for r in got if r["request_id"] == req.request_id)
    assert mine["state"] == "rejected" and mine["states"] == ["requested", "data", "training", "evaluating", "rejected"]
    assert mine["trigger"] == "DriftloopModelPerformanceDrop" and mine["version"] == loop.v1
    assert mine["gate"]["decision"] == "reject" and mine["gate"]["failed"] == failed

    # the Evidently reports of the breached windows (written off the monitor's loop), served from the reports
    # folder only
    folder = s.drift_dir / "reports" / "m_reg"

    def listed_as_on_disk() -> list[dict[str, Any]] | None:
        listed = loop.api()["reports"]
        on_disk = sorted(p.name for p in folder.glob("*.html"))
        return listed if on_disk and sorted(r["name"] for r in listed) == on_disk else None

    listed = wait_for(listed_as_on_disk, 90)
    page = requests.get(loop.base + listed[0]["url"], timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (folder / listed[0]["name"]).read_bytes()
    (s.drift_dir / "reports" / "secret.html").write_text("outside the model's folder")
    for bad in ("..%2Fsecret.html", "..%2F..%2Fstate.db", "x.txt", ".hidden.html", "nope.html"):
        r = requests.get(f"{loop.base}/models/m_reg/reports/{bad}", timeout=10)
        assert r.status_code == 404 and "outside" not in r.text, bad

    # unknown models: 404 naming the declared ones; the pages need no credentials and show none
    html_404 = requests.get(f"{loop.base}/models/ghost", timeout=10)
    assert html_404.status_code == 404 and html_404.headers["content-type"].startswith("text/html")
    assert all(f'href="/models/{n}"' in html_404.text for n in MODELS)
    api_404 = requests.get(f"{loop.base}/api/models/ghost", timeout=10)
    assert api_404.status_code == 404 and api_404.json()["models"] == MODELS
    index = requests.get(f"{loop.base}/models", timeout=10)
    assert index.status_code == 200 and f"champion v{loop.v1}" in index.text
    assert all(f'href="/models/{n}"' in index.text for n in MODELS)
    for body in (index.text, html_404.text, requests.get(f"{loop.base}/models/m_reg", timeout=10).text,
                 str(loop.api())):
        assert TOKEN not in body
    assert requests.post(f"{loop.base}/v1/alerts", json={"model": "m_reg"}, timeout=10).status_code == 401
    assert requests.get(f"{loop.base}/v1/alerts", timeout=10).status_code == 401  # the alert routes' guard is kept


def test_mlflow_links_point_at_the_tracking_server_ui(loop: Loop):
    from driftloop.drift.page import LoopData

    remote = LoopData(loop.s.model_copy(update={"mlflow_tracking_uri": "https://mlflow.example:5000/"}),
                      None)  # type: ignore[arg-type]
    assert remote.run_url("abc123") == "https://mlflow.example:5000/#/runs/abc123"
    assert remote.version_url("m_reg", "7") == "https://mlflow.example:5000/#/models/m_reg/versions/7"
    assert LoopData(loop.s, None).run_url("abc123") is None  # type: ignore[arg-type]


def _browser(profile: str) -> Any:
    """Headless Chromium through Debian's chromedriver (never Selenium Manager: no network here)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.skip(f"{path} is missing: install Debian's {package} package")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def test_page_shows_a_promotion_without_a_reload(loop: Loop):
    s, v2 = loop.s, loop.v2
    profile = tempfile.mkdtemp(prefix="loop-page-chromium-")
    try:
        driver = _browser(profile)
        try:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            def text(id_: str) -> str:
                return driver.find_element(By.ID, id_).text

            driver.get(f"{loop.base}/models/m_reg")
            wait = WebDriverWait(driver, 30, poll_frequency=0.2)
            wait.until(lambda _: text("champion") == f"v{loop.v1}" and text("challenger") == f"v{v2}")
            assert text("episode-state") == "active" and text("serving") == f"v{loop.v1}"
            rows = driver.find_elements(By.CSS_SELECTOR, "#windows tbody tr")
            assert len(rows) == 2 and all("yes: drift" in r.text for r in rows)
            assert "drift: episode" in text("requests") and "sent" in text("requests")
            wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#reports a"))  # written off the loop
            driver.execute_script("window.stillHere = 'yes'")  # a reload would forget it

            spec = declarations(s).model("m_reg")
            ev = promote_checked(s, make_producer(s), spec, v2, reason="loop page test", actor="test:loop-page")
            assert ev.version == v2 and ev.previous_version == loop.v1
            wait.until(lambda _: text("champion") == f"v{v2}")
            first = driver.find_element(By.CSS_SELECTOR, "#moves tbody tr").text
            assert f"v{loop.v1} → v{v2}" in first and "manual: loop page test" in first and "test:loop-page" in first
            assert driver.execute_script("return window.stillHere") == "yes"
            assert text("status").startswith("updated")
            logs = driver.get_log("browser")
            assert not [e for e in logs if e["level"] == "SEVERE"], logs
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

