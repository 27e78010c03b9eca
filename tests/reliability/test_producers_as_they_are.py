"""Producers as they really are: the same kind of traffic produced by driftloop's murmur2 producer, by a plain
confluent-kafka ``Producer`` (librdkafka's default ``consistent_random`` partitioner) and with null keys, into one
streams worker: offline rows, online values and labels equal the pandas reference for the first two; with null
keys every event is counted exactly once (in the order its entity's owner consumed it). A topic created with another
partition count than ``DRIFTLOOP_PARTITIONS`` is refused at start with a one-line error naming it
(``docs/producers.md``)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import orjson
import pytest
from confluent_kafka import Producer

from driftloop.app.producer import publish
from driftloop.app.supervisor import settings_env
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.streams.app import repartition_topic
from tests.helpers import apply_repo, end_offsets, read_all, valid, wait_streamed, worker
from tests.reference import offline_rows
from tests.test_partitioner import _plain_publish
from tests.test_streams_exact import _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability


def _null_key_publish(s: Settings, events: list[tuple[str, dict]]) -> None:
    """The events without a key (librdkafka then picks a random partition per record)."""
    p = Producer({"bootstrap.servers": s.bootstrap_servers})
    for topic, rec in events:
        p.produce(s.topic(topic), value=orjson.dumps(rec))
        p.poll(0)
    assert p.flush(30) == 0


def test_murmur2_default_partitioner_and_null_keys(settings: Settings, figure) -> None:
    """murmur2 and consistent_random producers: features and labels exact. Null keys: a record without a key lands
    on any partition and is routed to its entity's owner, so an entity's records reach it in another order than
    produced (Kafka orders a partition, not a key): each is counted exactly once, in the order consumed
    (``docs/producers.md``)."""
    store, decls = apply_repo(settings)
    views = _views(store)
    a = ads_traffic(3000, users=200, rate=400, disorder_s=2.0, seed=61)
    b = ads_traffic(3000, users=200, rate=400, disorder_s=2.0, seed=62, start_us=max(r["ts"] for _, r in a) + 10**6)
    c = ads_traffic(3000, users=200, rate=400, disorder_s=2.0, seed=63, start_us=max(r["ts"] for _, r in b) + 10**6)
    with worker(settings, "streams") as proc:
        publish(settings, a)
        wait_streamed(settings, a, views, alive=proc)
        _plain_publish(settings, decls, b)
        wait_streamed(settings, a + b, views, alive=proc)
        check_exact(settings, store, a + b, views, decls=decls)
        _null_key_publish(settings, c)
        wait_streamed(settings, a + b + c, views, alive=proc)
        assert proc.poll() is None
    dead = {orjson.loads(m.value())["event_id"]: dict(m.headers())["reason"].decode()
            for m in read_all(settings, "dlq", timeout=5)}
    assert set(dead.values()) <= {"late"}, dead  # a keyless record routed behind its entity's watermark
    for v in views:
        rows = offline_rows(settings, v)
        want = {r["event_id"] for r in valid(a + b + c, v.topic)} - set(dead)
        assert rows["event_id"].is_unique and set(rows["event_id"]) == want, f"{v.name}: an event lost or doubled"
    routed = sum(sum(end_offsets(settings, repartition_topic(t)).values()) for t in decls.topics)
    assert routed > 0, "no record was misplaced: the test proves nothing"
    figure("producers as they are (murmur2, consistent_random): events lost or miscounted", 0, "events",
           events=len(a) + len(b))
    figure("producers as they are (null keys): events lost or counted twice", 0, "events", events=len(c),
           routed=routed, dead_lettered_late=len(dead))


def test_a_topic_with_another_partition_count_is_refused(settings: Settings, figure) -> None:
    apply_repo(settings)
    s = settings.model_copy(update={"topic_prefix": f"w{uuid.uuid4().hex[:8]}."})  # no topics yet
    wider = s.model_copy(update={"partitions": s.partitions + 1})
    ensure_topics(wider, ["events.impressions", "events.clicks"])  # created by hand before driftloop did
    done = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "worker", "streams"], env=settings_env(s),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    want = (f"the streams worker needs {s.partitions} partitions (settings.partitions) in every topic it consumes; "
            f"these differ: ")
    assert want in done.stderr, done.stderr[-2000:]
    assert s.topic("events.impressions") in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    figure("producers as they are: topic with another partition count refused at start", 1, "refusals")
