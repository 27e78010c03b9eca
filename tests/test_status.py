"""``driftloop status``: a real embedded stack all up (exit 0), one worker killed while its supervisor cannot
restart it (exit 1, that worker down), no stack and no broker (exit 2); the freshness quantile against numpy."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from driftloop.app.status import cmd_status, freshness_p99
from driftloop.app.supervisor import start_detached, stop_stack
from driftloop.bench.common import total
from driftloop.core.broker import free_port
from driftloop.core.contracts import DriftReport, RetrainRequest
from driftloop.core.kafka import flush_or_raise, make_producer
from driftloop.core.metrics import LATENCY_BUCKETS, scrape
from driftloop.core.requests import RequestStore
from driftloop.core.settings import Settings
from tests.helpers import wait_for
from tests.test_cli import versions

WORKERS = {"streams", "serving", "drift", "retrain"}


def status(capsys: pytest.CaptureFixture[str], s: Settings) -> tuple[int, dict[str, Any], str]:
    """``driftloop status --json``: exit code, the JSON object, stderr."""
    capsys.readouterr()
    rc = cmd_status(argparse.Namespace(json=True), s)
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def gone(pid: int) -> bool:
    """The process ended (a zombie its parent has not reaped counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (each worker runs in a session of its own)."""
    if pid <= 0:  # no lock file written: nothing started (and pid 0 would mean this process group)
        return
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [*root.children(recursive=True), root]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def lag(port: int) -> float | None:
    """A worker's consumer lag now: the sum of its driftloop_consumer_lag samples (None without any)."""
    got = scrape(port)
    return total(got, "driftloop_consumer_lag") if any(n == "driftloop_consumer_lag" for n, _ in got) else None


def numpy_quantile(q: float, values: np.ndarray, bounds: tuple[float, ...]) -> float:
    """Prometheus' histogram_quantile computed independently: bucket the values with numpy, find the first
    bucket whose cumulative count reaches q·n, interpolate linearly inside it (the +Inf bucket: its lower bound)."""
    counts, _ = np.histogram(values, bins=[0.0, *bounds, np.inf])
    cum = np.cumsum(counts)
    rank = q * len(values)
    i = int(np.searchsorted(cum, rank, side="left"))
    edges = [0.0, *bounds]
    if i == len(bounds):
        return bounds[-1]
    below = cum[i - 1] if i else 0
    return edges[i] + (edges[i + 1] - edges[i]) * (rank - below) / counts[i]


def test_freshness_p99_per_view_and_overall_matches_numpy() -> None:
    rng = np.random.default_rng(5)
    obs = {"fast": rng.lognormal(-3.0, 0.8, 5000), "slow": rng.lognormal(-1.0, 0.6, 3000),
           "late": rng.uniform(8.0, 30.0, 200)}  # the p99 lands in the +Inf bucket
    registry = CollectorRegistry()
    h = Histogram("driftloop_feature_freshness_seconds", "x", ["view"], buckets=LATENCY_BUCKETS, registry=registry)
    for view, values in obs.items():
        for v in values:
            h.labels(view=view).observe(float(v))
    samples = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(generate_latest(registry).decode()) for smp in fam.samples}

    got = freshness_p99(samples)
    assert got["views"]["late"] == 10.0
    for view in ("fast", "slow"):
        want = numpy_quantile(0.99, obs[view], LATENCY_BUCKETS)
        assert got["views"][view] == pytest.approx(want, rel=1e-9)
        exact = float(np.quantile(obs[view], 0.99))  # the true p99 lies in the bucket the estimate interpolates in
        edges = [0.0, *LATENCY_BUCKETS]
        i = int(np.searchsorted(edges, exact))
        assert edges[i - 1] <= got["views"][view] <= edges[i]
    pooled = np.concatenate(list(obs.values()))
    assert got["overall"] == pytest.approx(numpy_quantile(0.99, pooled, LATENCY_BUCKETS), rel=1e-9)
    assert freshness_p99({}) == {"overall": None, "views": {}}


def test_no_stack_no_broker_unreachable_broker_and_a_dead_stack(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=None)
    rc, st, err = status(capsys, s)
    assert rc == 2 and st["down"] == []
    assert err.count("\n") == 1 and err.startswith("driftloop status: no stack running on ") and "driftloop up" in err

    # what the state database says is shown without a stack: the last request of each model and its state
    store = RequestStore(s)
    store.add(RetrainRequest(model_name="m", reason="manual"))
    last = store.add(RetrainRequest(model_name="m", reason="drift"))
    store.move(last.request_id, "rejected", version="4")
    with sqlite3.connect(s.root / "state.db") as db:
        want = db.execute("select request_id, state, reason, version from retrain_requests where model = 'm' "
                          "order by created_us desc limit 1").fetchone()
    versions(s.tracking_uri, "m", tmp_path / "artifact", n=3)  # MLflow's own client sets the champion alias
    rc, st, _ = status(capsys, s)
    r = st["models"]["m"]["retrain"]
    assert rc == 2 and (r["request_id"], r["state"], r["reason"], r["version"]) == want and r["requests"] == 2
    assert st["models"]["m"]["champion"] == "3"

    t0 = time.monotonic()
    rc, st, err = status(capsys, s.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}))
    assert rc == 1 and st["broker"]["up"] is False and st["down"] == ["broker"] and err == ""
    assert time.monotonic() - t0 < 10

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    s.stack_file.write_text(json.dumps({"bootstrap_servers": f"127.0.0.1:{free_port()}", "supervisor_pid": gone.pid,
                                        "workers": {"serving": gone.pid}, "metrics_ports": {"serving": free_port()}}))
    rc, st, _ = status(capsys, s)
    assert rc == 1 and set(st["down"]) == {"broker", "worker serving", "supervisor"}
    assert st["workers"]["serving"]["process"] is False and st["workers"]["serving"]["metrics"] is False


WORKER = """
import json, sys, time
from driftloop.core import metrics as m
spec = json.loads(sys.argv[1])
for topic, partition, lag in spec["lag"]:
    m.CONSUMER_LAG.labels(component=spec["component"], topic=topic, partition=str(partition)).set(lag)
for view, values in spec["freshness"].items():
    for v in values:
        m.FRESHNESS.labels(view=view).observe(v)
for model, v in spec["serving"].items():
    m.SERVING_VERSION.labels(model=model).set(v)
m.serve_metrics(spec["port"], spec["component"])
time.sleep(600)
"""


def test_status_reads_each_workers_process_and_metrics(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """Fast (the default suite): stand-in workers serving the project's own metrics on real /metrics endpoints,
    a stack.json naming them, the session's broker. One is killed (a zombie its parent has not reaped, as under
    a stopped supervisor), one hangs (SIGSTOP: its /metrics never answers)."""
    s = settings
    rng = np.random.default_rng(2)
    fresh = {"v_a": rng.lognormal(-2.5, 0.7, 400).tolist(), "v_b": rng.lognormal(-1.5, 0.5, 300).tolist()}
    lags = {"streams": [("events.x", 0, 5), ("events.x", 1, 7)], "serving": [("events.x", 0, 11)], "drift": [],
            "retrain": [("labels", 0, 0)]}
    procs: dict[str, subprocess.Popen] = {}
    ports = {n: free_port() for n in lags}
    supervisor = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        for n in lags:
            spec = {"component": n, "port": ports[n], "lag": lags[n], "freshness": fresh if n == "streams" else {},
                    "serving": {"m1": 7, "m2": 2} if n == "serving" else {}}
            procs[n] = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec)], start_new_session=True)
        wait_for(lambda: all(answers(p) for p in ports.values()), 30)
        s.stack_file.write_text(json.dumps({
            "bootstrap_servers": s.bootstrap_servers, "supervisor_pid": supervisor.pid, "metrics_ports": ports,
            "workers": {n: p.pid for n, p in procs.items()}, "restarts": {"serving": 2}}))
        report = DriftReport(model_name="m1", model_version="7", window_start_ts=1, window_end_ts=2, rows=300,
                             columns={}, drift_share=0.25, drifted=False)
        p = make_producer(s)
        p.produce(s.topic("drift.reports"), key=b"m1", value=report.to_bytes())
        flush_or_raise(p)
        del p

        rc, st, _ = status(capsys, s)
        assert rc == 0 and st["down"] == [] and st["broker"]["up"] is True
        assert list(st["workers"]) == ["streams", "serving", "drift", "retrain"]
        assert {n: (w["up"], w["pid"], w["restarts"]) for n, w in st["workers"].items()} == {
            n: (True, p.pid, 2 if n == "serving" else 0) for n, p in procs.items()}
        assert {n: w["lag"] for n, w in st["workers"].items()} == {
            n: (sum(x[2] for x in v) if v else None) for n, v in lags.items()}
        assert all(w["heartbeat_age_s"] is not None and w["heartbeat_age_s"] < 120 for w in st["workers"].values())
        for view, values in fresh.items():
            assert st["freshness_p99_s"]["views"][view] == pytest.approx(
                numpy_quantile(0.99, np.array(values), LATENCY_BUCKETS), rel=1e-9)
        assert st["freshness_p99_s"]["overall"] == pytest.approx(
            numpy_quantile(0.99, np.array(fresh["v_a"] + fresh["v_b"]), LATENCY_BUCKETS), rel=1e-9)
        assert {m: x["serving_version"] for m, x in st["models"].items()} == {"m1": "7", "m2": "2"}
        assert st["models"]["m1"]["drift"]["drift_share"] == 0.25 and st["models"]["m2"]["drift"] is None
        assert st["models"]["m1"]["champion"] is None  # no model store

        os.killpg(procs["serving"].pid, signal.SIGKILL)  # not reaped: a zombie until procs["serving"].wait()
        wait_for(lambda: gone(procs["serving"].pid), 10, every=0.05)
        assert psutil.pid_exists(procs["serving"].pid)
        os.kill(procs["drift"].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        rc, st, _ = status(capsys, s)
        assert rc == 1 and st["down"] == ["worker serving", "worker drift"]
        assert (st["workers"]["serving"]["process"], st["workers"]["drift"]["process"]) == (False, True)
        assert st["workers"]["drift"]["metrics"] is False and st["workers"]["drift"]["error"].startswith("/metrics")
        assert st["workers"]["streams"]["up"] and st["workers"]["retrain"]["up"]
        assert time.monotonic() - t0 < 15  # the hung worker costs its 2 s timeout, not more
    finally:
        for proc in [*procs.values(), supervisor]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow  # the real stack took 90-140 s to be ready on 2 busy cores (workers import Feast, MLflow, Ray...)
def test_status_of_a_running_stack_and_of_a_killed_worker(settings: Settings,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    s = settings
    t0 = time.monotonic()
    try:
        info = start_detached(s, timeout=300)
    except (RuntimeError, TimeoutError):
        lock = s.root / "stack.lock"
        kill_tree(int(lock.read_text().strip() or 0) if lock.exists() else 0)  # it may outlive start_detached's wait
        raise
    started_s = time.monotonic() - t0
    supervisor = info["supervisor_pid"]
    stopped = False
    try:
        report = DriftReport(model_name="ctr", model_version="3", window_start_ts=1, window_end_ts=2, rows=500,
                             columns={}, drift_share=0.375, drifted=True, breached=True, reasons=["drift"],
                             episode="started")
        p = make_producer(s)
        p.produce(s.topic("drift.reports"), key=b"ctr", value=report.to_bytes())
        flush_or_raise(p)
        del p  # no reconnect attempts once the session's broker stops

        before = {n: lag(port) for n, port in info["metrics_ports"].items()}
        t0 = time.monotonic()
        rc, st, _ = status(capsys, s)
        took = time.monotonic() - t0
        assert rc == 0, st
        assert st["broker"]["up"] is True and st["stack"]["supervisor"] == {"pid": supervisor, "up": True}
        assert set(st["workers"]) == WORKERS and all(w["up"] and w["restarts"] == 0 for w in st["workers"].values())
        assert {n: w["pid"] for n, w in st["workers"].items()} == info["workers"]
        after = {n: lag(port) for n, port in info["metrics_ports"].items()}
        for n, w in st["workers"].items():  # lag: the sum of the worker's own gauge samples (reported every 5 s)
            assert w["lag"] in (before[n], after[n]), (n, w["lag"], before[n], after[n])
        ctr = st["models"]["ctr"]
        assert ctr["declared"] and ctr["champion"] is None and ctr["serving_version"] is None
        assert {k: ctr["drift"][k] for k in ("version", "drift_share", "breached", "episode", "reasons")} == {
            "version": "3", "drift_share": 0.375, "breached": True, "episode": "started", "reasons": ["drift"]}

        # the supervisor cannot restart anything while stopped: the killed worker stays down
        os.kill(supervisor, signal.SIGSTOP)
        stopped = True
        victim = info["workers"]["serving"]
        os.killpg(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim), 10, every=0.05)
        rc, st, _ = status(capsys, s)
        assert rc == 1 and st["down"] == ["worker serving"]
        assert st["workers"]["serving"]["up"] is False and st["workers"]["serving"]["process"] is False
        assert all(st["workers"][n]["up"] for n in WORKERS - {"serving"})
    finally:
        if stopped:
            os.kill(supervisor, signal.SIGCONT)
        stop_stack(s)
    assert gone(supervisor) and all(gone(p) for p in info["workers"].values())
    print(f"stack ready in {started_s:.1f}s; status took {took:.1f}s")
