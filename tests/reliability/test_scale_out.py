"""Scale-out: while events stream in, a second streams worker and a second serving worker join (a rebalance
each), and later the first ones leave (another each). Features and labels equal the pandas reference, every
impression is predicted (exactly once after de-duplication by event id), both groups commit every partition
to its end, and the longest pause in progress around each rebalance is the figure."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from driftloop.app.producer import publish
from driftloop.bench.model_fixtures import register_good
from driftloop.bench.serving import audit, read_all
from driftloop.core.broker import free_port
from driftloop.core.contracts import now_us
from driftloop.core.kafka import consumer_config, make_producer
from driftloop.core.settings import Settings
from driftloop.registry.aliases import promote
from tests.helpers import apply_repo, valid, wait_committed, wait_progress, wait_streamed, worker
from tests.test_streams_exact import _rows, _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability

PARTITIONS = 4


class Progress(threading.Thread):
    """Samples the streams (bronze rows) and serving (the predictions topic's end offsets) progress every 0.25 s."""

    def __init__(self, s: Settings):
        super().__init__(daemon=True)
        self.s, self.samples, self.stop = s, [], threading.Event()

    def run(self) -> None:
        c = Consumer(consumer_config(self.s, f"progress-{uuid.uuid4().hex}"))
        topic = self.s.topic("predictions")
        try:
            while not self.stop.is_set():
                try:
                    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
                    preds = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
                except KafkaException:
                    continue  # a slow broker answer: the next sample
                self.samples.append((time.monotonic(), _rows(self.s, "bronze_impressions"), preds))
                time.sleep(0.25)
        finally:
            c.close()

    def pause(self, at: float, end: float, which: int) -> float | None:
        """The longest time without progress of ``which`` (1 streams, 2 serving) between ``at`` and ``end``
        (from ``at`` to the first change, between changes, from the last change to ``end``); None when nothing
        changed (no events left to measure)."""
        pts = [(x[0], x[which]) for x in self.samples if at <= x[0] <= end]
        changes = [t for (t, v), (_, prev) in zip(pts[1:], pts, strict=False) if v != prev]
        times = [at, *changes, end]
        return max(b - a for a, b in zip(times, times[1:], strict=False)) if changes else None


def test_workers_join_and_leave_mid_stream(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers, partitions=PARTITIONS,
                 topic_prefix=f"so{uuid.uuid4().hex[:8]}.")
    store, decls = apply_repo(s)
    views = _views(store)
    promote(s, make_producer(s), "ctr", register_good(s, seed=1, model="ctr"), reason="test")
    events = ads_traffic(60_000, seed=41, users=1000, rate=700, start_us=now_us() - 60 * 10**6)
    impressions = {r["event_id"] for r in valid(events, "events.impressions")}

    def own_port() -> Settings:  # each process its own metrics port
        return s.model_copy(update={"metrics_port": free_port()})

    sender = threading.Thread(target=publish, args=(s, events), kwargs={"rate": 300}, daemon=True)
    progress = Progress(s)
    moments: dict[str, tuple[float, float]] = {}  # rebalance → (from, to) of its pause measurement
    with worker(own_port(), "streams", log_name="streams-a") as streams_a, \
            worker(own_port(), "serving", log_name="serving-a") as serving_a:
        sender.start()
        progress.start()
        time.sleep(8)
        join = time.monotonic()  # the second ones start (they join the groups once up)
        with worker(own_port(), "streams", ready_timeout=300, log_name="streams-b") as streams_b, \
                worker(own_port(), "serving", ready_timeout=300, log_name="serving-b") as serving_b:
            time.sleep(15)
            moments["join"] = (join, time.monotonic())
            assert streams_a.poll() is None and serving_a.poll() is None
            leave = time.monotonic()  # the second ones stop (SIGTERM: they leave the groups)
        assert streams_b.returncode is not None and serving_b.returncode is not None
        time.sleep(15)
        moments["leave"] = (leave, time.monotonic())
        assert sender.is_alive(), "the events ran out before the second workers left: no pause to measure"
        sender.join(timeout=300)
        wait_streamed(s, events, views, alive=streams_a)
        wait_progress(lambda: impressions <= {orjson.loads(m.value())["event_id"]
                                              for m in read_all(s, "predictions", 10**9, timeout=0, idle_s=0.5)},
                      lambda: progress.samples[-1][2], 90, lambda: "not every impression predicted", every=1.0)
        wait_committed(s, f"{s.topic_prefix}serving.ctr", ["events.impressions"], alive=serving_a)
        progress.stop.set()
    check_exact(s, store, events, views, decls=decls)
    preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", 10**9, timeout=0, idle_s=1)]
    result = audit(s, impressions, preds)
    assert result["lost"] == 0 and result["misversioned"] == 0 and result["unexpected"] == 0, result
    for moment, (t0, t1) in moments.items():
        for which, name in ((1, "streams"), (2, "serving")):
            pause = progress.pause(t0, t1, which)
            assert pause is not None, f"{name} made no progress around the {moment}"
            figure(f"scale-out: {name}'s longest pause around the {moment}", round(pause, 1), "s",
                   measured_s=round(t1 - t0, 1))
    figure("scale-out: impressions lost", result["lost"], "events")
    figure("scale-out: duplicate predictions (removed by event id)", result["duplicated"], "predictions")
