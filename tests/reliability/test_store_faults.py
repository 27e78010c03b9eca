"""Store faults under the streams worker: the offline store's directory unavailable for 10 s (replaced by a
file: the tests run as root, whom a read-only mode does not stop), and the Redis online store stopped for
10 s (restarted from its append-only file). The worker stops committing offsets, reports the failing store
on ``driftloop_store_up``/``driftloop_store_errors_total`` and in its log, stays up, and once the store is
back catches up with features and labels equal to the pandas reference."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from driftloop.app.producer import publish
from driftloop.core.broker import free_port
from driftloop.core.contracts import now_us
from driftloop.core.metrics import scrape
from driftloop.core.settings import Settings
from tests.helpers import apply_repo, committed_offsets, wait_for, wait_streamed, worker
from tests.servers import RedisServer
from tests.test_streams_exact import _rows, _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability

OUTAGE_S = 10.0


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
