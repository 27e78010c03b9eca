"""Store faults under the streams worker: the offline store's directory unavailable for 10 s (replaced by a
file: the tests run as root, whom a read-only mode does not stop), and the Redis online store stopped for
10 s (restarted from its append-only file). The worker stops committing offsets, reports the failing store
on ``driftloop_store_up``/``driftloop_store_errors_total`` and in its log, stays up, and once the store is
back catches up with features and labels equal to the pandas reference."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from driftloop.app.producer import publish
from driftloop.core.broker import free_port
from driftloop.core.contracts import ModelPromoted, now_us
from driftloop.core.metrics import scrape
from driftloop.core.requests import RequestStore
from driftloop.core.settings import Settings
from tests.helpers import apply_repo, committed_offsets, read_all, wait_for, wait_streamed, worker
from tests.servers import RedisServer
from tests.test_retrain import items_settings
from tests.test_streams_exact import _rows, _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability

OUTAGE_S = 10.0
LOCK_S = 60.0


def _store(port: int, store: str) -> tuple[float, float]:
    """(driftloop_store_up, driftloop_store_errors_total) of the streams worker for ``store``."""
    got = scrape(port)
    labels = (("component", "streams"), ("store", store))
    return got.get(("driftloop_store_up", labels), 1.0), got.get(("driftloop_store_errors_total", labels), 0.0)


def _outage(s: Settings, store: str, down: Callable[[], None], up: Callable[[], None], figure) -> None:
    """Events stream in; ``down()`` for OUTAGE_S seconds, then ``up()``: checks and figures."""
    store_obj, _ = apply_repo(s)
    views = _views(store_obj)
    events = ads_traffic(8000, seed=51, users=300, rate=500, start_us=now_us() - 30 * 10**6)
    group, topics = f"{s.topic_prefix}streams", ["events.impressions", "events.clicks"]
    with worker(s, "streams") as streams:
        sender = threading.Thread(target=publish, args=(s, events), kwargs={"rate": 800}, daemon=True)
        sender.start()
        wait_for(lambda: _rows(s, "bronze_impressions") > 500, 90)
        down()
        try:
            wait_for(lambda: _store(s.metrics_port, store)[0] == 0.0, OUTAGE_S)  # noticed and reported
            time.sleep(4)  # Faust's commit interval (2.8 s) passes: what was acked before the outage is committed
            frozen = committed_offsets(s, group, topics)
            time.sleep(OUTAGE_S - 4)
            assert committed_offsets(s, group, topics) == frozen, "offsets were committed while the store was down"
            up_now, errors = _store(s.metrics_port, store)
            assert up_now == 0.0 and errors > 0 and streams.poll() is None
        finally:
            up()
        back = time.monotonic()
        wait_for(lambda: _store(s.metrics_port, store)[0] == 1.0, 60)
        recovered = time.monotonic() - back
        sender.join(timeout=120)
        wait_streamed(s, events, views, alive=streams)
        assert streams.poll() is None, "the worker exited"
    log = (s.root / "streams.log").read_text()
    assert f"{store} store write failed" in log and f"{store} store writes succeed again" in log
    check_exact(s, store_obj, events, views)
    figure(f"store fault ({store}): writes succeed again after the store is back", round(recovered, 1), "s",
           outage_s=OUTAGE_S, errors=int(errors))
    figure(f"store fault ({store}): events lost", 0, "events")


def _settings(tmp_path: Path, bootstrap_servers: str, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers, partitions=2,
                    topic_prefix=f"sf{uuid.uuid4().hex[:8]}.", metrics_port=free_port(), **kw)


def test_offline_store_unavailable_for_10s(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    s = _settings(tmp_path, bootstrap_servers)
    away = tmp_path / "offline.away"

    def down() -> None:
        s.offline_dir.rename(away)
        s.offline_dir.write_text("not a directory: the offline store is away")

    def up() -> None:
        s.offline_dir.unlink()
        away.rename(s.offline_dir)

    _outage(s, "offline", down, up, figure)


def test_redis_online_store_stopped_for_10s(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    server = RedisServer(dir=str(redis_dir)).start()
    try:
        s = _settings(tmp_path, bootstrap_servers, redis_url=server.url)
        _outage(s, "online", server.stop, server.start, figure)
    finally:
        server.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


def _mlflow(port: int, component: str) -> float:
    return scrape(port).get(("driftloop_store_up", (("component", component), ("store", "mlflow"))), -1.0)


def test_mlflow_store_locked_for_60s(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    """MLflow's sqlite store held under an exclusive lock for 60 s (a backup, a stuck writer) from the moment the
    retrain worker's bootstrap request starts training, while serving polls the champion alias. Both report the
    store down on ``driftloop_store_up`` and stay up; the request keeps its attempts (both of its 2 would be
    spent in the outage otherwise), waits, and once the lock is gone is promoted exactly once, and serving
    picks the champion up."""
    quiet = {n: {"min_labels": 10**9} for n in ("m_reg", "m_mc", "m_custom", "m_flaky")}  # only m_bin trains
    s = items_settings(tmp_path, bootstrap_servers, model_overrides=quiet, retrain_max_attempts=2,
                       retrain_backoff_s=1.0, serving_alias_poll_s=1.0)
    ports = {"retrain": free_port(), "serving": free_port()}
    store = RequestStore(s)
    lock = sqlite3.connect(s.root / "mlflow.db", timeout=60, isolation_level=None)
    with worker(s.model_copy(update={"metrics_port": ports["serving"]}), "serving") as serving, \
            worker(s.model_copy(update={"metrics_port": ports["retrain"]}), "retrain", log_name="retrain") as retrain:
        # the bootstrap request is under way (its MLflow steps come after training): lock the store now
        wait_for(lambda: any(r.state == "training" for r in store.of_model("m_bin")), 120, every=0.1)
        lock.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        try:
            wait_for(lambda: all(_mlflow(port, name) == 0.0 for name, port in ports.items()), 40)
            wait_for(lambda: time.monotonic() - locked >= LOCK_S, LOCK_S + 5)
            assert retrain.poll() is None and serving.poll() is None, "a worker exited while MLflow was locked"
            rows = store.of_model("m_bin")
            assert all(not r.done for r in rows), [(r.state, r.error) for r in rows]
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        back = time.monotonic()
        row = wait_for(lambda: next((r for r in store.of_model("m_bin") if r.done), None), 300)
        promoted_s = time.monotonic() - back
        wait_for(lambda: _mlflow(ports["serving"], "serving") == 1.0 and scrape(ports["serving"]).get(
            ("driftloop_serving_model_version", (("model", "m_bin"),))) == float(row.version), 60)
        assert _mlflow(ports["retrain"], "retrain") == 1.0
        assert retrain.poll() is None and serving.poll() is None
    assert row.state == "promoted" and row.attempt == 0, (row.state, row.attempt, row.error)
    assert [r.request_id for r in store.of_model("m_bin")] == [row.request_id]  # no second bootstrap request
    promoted = [ModelPromoted.from_bytes(m.value()) for m in read_all(s, "models.promoted")]
    assert [p.version for p in promoted] == [row.version]
    log = (s.root / "retrain.log").read_text()
    assert "MLflow store unavailable" in log and "MLflow store answers again" in log
    assert "attempt 1 failed" not in log and "database is locked" in log
    figure("store fault (mlflow, locked 60 s): request promoted after the lock", round(promoted_s, 1), "s",
           attempts_spent=row.attempt)
    figure("store fault (mlflow): requests lost or doubled", 0, "requests")
