"""A broker stall: the embedded broker is stopped with SIGSTOP for 20 s mid-stream, then resumed. The streams
and serving workers recover without a restart; features and labels equal the pandas reference and every
impression is predicted (after de-duplication by event id); the seconds each worker took to move again after
the broker came back are the figures."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import orjson
import pytest

from driftloop.app.producer import publish
from driftloop.bench.model_fixtures import register_good
from driftloop.bench.serving import audit, read_all, source_offsets
from driftloop.core.broker import EmbeddedBroker, free_port
from driftloop.core.kafka import make_producer
from driftloop.core.settings import Settings
from driftloop.registry.aliases import promote
from tests.helpers import apply_repo, valid, wait_for, wait_progress, wait_streamed, worker
from tests.test_streams_exact import _rows, _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability

STALL_S = 20.0


def _predictions(s: Settings) -> list[dict]:
    return [orjson.loads(m.value()) for m in read_all(s, "predictions", 10**9, timeout=0, idle_s=0.3)]


def _predicted(s: Settings) -> set[str]:
    return {p["event_id"] for p in _predictions(s)}


def test_workers_ride_out_a_20s_broker_stall(tmp_path: Path, figure) -> None:
    events = ads_traffic(20_000, seed=21, users=500, rate=1000)
    impressions = {r["event_id"] for r in valid(events, "events.impressions")}
    with EmbeddedBroker(log_file=tmp_path / "broker.log") as broker:
        s = Settings(data_dir=tmp_path / "data", bootstrap_servers=broker.bootstrap_servers, topic_prefix="st.",
                     partitions=2, metrics_port=free_port())
        store, decls = apply_repo(s)
        views = _views(store)
        promote(s, make_producer(s), "ctr", register_good(s, seed=1, model="ctr"), reason="test")
        with worker(s, "streams") as streams, \
                worker(s.model_copy(update={"metrics_port": free_port()}), "serving") as serving:
            sender = threading.Thread(target=publish, args=(s, events), kwargs={"rate": 500}, daemon=True)
            sender.start()
            wait_for(lambda: _rows(s, "bronze_impressions") > 1000 and len(_predicted(s)) > 1000, 120)
            preds_at = len(_predicted(s))  # none can be added while the broker is stopped
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(STALL_S)
                rows_at = _rows(s, "bronze_impressions")  # a batch consumed before the stall may still land
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            resumed = time.monotonic()
            moved: dict[str, float] = {}

            def progressed() -> bool:
                if "streams" not in moved and _rows(s, "bronze_impressions") > rows_at:
                    moved["streams"] = time.monotonic() - resumed
                if "serving" not in moved and len(_predicted(s)) > preds_at:
                    moved["serving"] = time.monotonic() - resumed
                return len(moved) == 2

            wait_progress(progressed, lambda: sorted(moved), 120, lambda: f"moved again: {sorted(moved)}",
                          every=0.25)
            sender.join(timeout=300)
            assert not sender.is_alive(), "the producer never finished"
            wait_streamed(s, events, views, alive=streams)
            wait_progress(lambda: impressions <= _predicted(s), lambda: len(_predicted(s)), 90,
                          lambda: f"{len(impressions - _predicted(s))} impressions not predicted", every=1.0)
            assert streams.poll() is None and serving.poll() is None, "a worker exited during the stall"
        check_exact(s, store, events, views, decls=decls)
        result = audit(s, impressions, _predictions(s))
        assert result["lost"] == 0 and result["misversioned"] == 0, result
        assert set(source_offsets(s, "events.impressions", len(impressions))) == impressions
    figure("broker stall: streams moving again after resume", round(moved["streams"], 1), "s", stall_s=STALL_S)
    figure("broker stall: serving moving again after resume", round(moved["serving"], 1), "s", stall_s=STALL_S)
    figure("broker stall: events lost", result["lost"], "events")
    figure("broker stall: duplicate predictions (removed by event id)", result.get("duplicated", 0), "predictions")
