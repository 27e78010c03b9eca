"""Producers as they are: librdkafka's default partitioner (``consistent_random``: kcat, a plain confluent-kafka
Producer) puts a key on another partition than Java's murmur2 (driftloop's producers) for about half the keys.
Features and labels must stay exact either way, also with two streams workers that each own some partitions."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import orjson
from confluent_kafka import Producer

from driftloop.app.producer import publish
from driftloop.core.declarations import Declarations, TopicSpec
from driftloop.core.kafka import make_producer
from driftloop.core.settings import Settings
from driftloop.features.windows import specs_from_feast
from driftloop.streams.app import ORIGIN, Router, repartition_topic
from driftloop.streams.engine import Record
from tests.helpers import apply_repo, end_offsets, read_topic, wait_for, wait_streamed, worker
from tests.test_streams_exact import ads_traffic, check_exact

ASSIGNED = "partitions assigned: "  # streams/app.py's log lines
RECOVERED = "table recovered"


def _plain_publish(s: Settings, decls: Declarations, events: list[tuple[str, dict]]) -> None:
    """The events keyed by entity as any client would send them: librdkafka's defaults, no driftloop config."""
    p = Producer({"bootstrap.servers": s.bootstrap_servers, "partitioner": "consistent_random"})
    for topic, rec in events:
        p.produce(s.topic(topic), key=str(rec[decls.topics[topic].key]).encode(), value=orjson.dumps(rec))
        p.poll(0)
    assert p.flush(30) == 0


def _crc32_partition(key: bytes, n: int) -> int:
    """librdkafka's consistent_random for a key: CRC32 of the key modulo the partition count."""
    return zlib.crc32(key) % n


def test_router_puts_keys_where_murmur2_producers_do(settings: Settings):
    """The worker's partition of a key is where librdkafka's murmur2_random producer (driftloop's) put it,
    and consistent_random disagrees for a good share of keys (so the other test routes many records)."""
    decls = apply_repo(settings)[1]
    keys = [f"u{i}".encode() for i in range(400)]
    p = make_producer(settings)
    for k in keys:
        p.produce(settings.topic("events.clicks"), key=k, value=b"{}")
    assert p.flush(30) == 0
    placed = {m.key(): m.partition() for m in read_topic(settings, "events.clicks", len(keys))}
    router = Router(settings, decls)
    assert placed == {k: router.partition(k) for k in keys}
    moved = sum(router.partition(k) != _crc32_partition(k, settings.partitions) for k in keys)
    assert 0.3 * len(keys) < moved < 0.7 * len(keys)


def test_router_copies_misplaced_records_and_reads_copies_at_their_source_offset(tmp_path):
    """A misplaced record becomes a copy on its owner's partition of the repartition topic (its origin in a
    header); the copy reaches the engine on the virtual partition of its (source, owner) stream at its source
    offset, which ``source_partition`` maps back; a placed record passes as it is."""
    s = Settings(data_dir=tmp_path, partitions=3, topic_prefix="x.")
    decls = Declarations(topics={"ev": TopicSpec(name="ev", key="user_id", fields={"user_id": "string"})})
    router = Router(s, decls)
    key = next(f"u{i}".encode() for i in range(100) if router.partition(f"u{i}".encode()) == 2)
    produced: list[tuple] = []
    placed = SimpleNamespace(topic="x.ev", partition=2, offset=7, key=key, value=b"{}", headers=None)
    misplaced = SimpleNamespace(topic="x.ev", partition=0, offset=9, key=key, value=b"{}", headers=[("h", b"1")])
    no_key = SimpleNamespace(topic="x.ev", partition=router.partition(b"u5"), offset=4, key=None,
                             value=b'{"user_id": "u5"}', headers=None)  # placed by its value's entity
    got = router.records([placed, misplaced, no_key], lambda *a: produced.append(a))
    assert got == [Record("ev", 2, 7, key, b"{}"), Record("ev", no_key.partition, 4, None, no_key.value)]
    assert produced[0] == ("x.ev.repartition", key, b"{}", 2, [("h", b"1"), (ORIGIN, b"0:9")])
    copy = SimpleNamespace(topic="x.ev.repartition", partition=2, offset=0, key=key, value=b"{}",
                           headers=produced[0][4])
    (r,) = router.records([copy], lambda *a: produced.append(a))
    assert (r.topic, r.partition, r.offset) == ("ev", 3 * (1 + 0) + 2, 9)
    assert r.partition % 3 == 2 and router.source_partition(r.partition) == 0 and router.source_partition(2) == 2


def test_either_partitioner_exact_on_two_workers(settings: Settings):
    """Phase A (driftloop's murmur2 producer) on worker A alone; worker B joins (each then owns one partition)
    and phase B comes from a plain consistent_random producer, so about half the entities arrive on the
    partition the OTHER worker owns, away from their phase-A state; B leaves and phase C (murmur2) goes to A,
    which continues B's entities from the changelog. Offline rows, online values and labels equal the
    reference for all three phases. (The old worker was exact here with one worker, not with two: a moved
    entity's windows started again from nothing on the other worker.)"""
    store, decls = apply_repo(settings)
    views = specs_from_feast(store.list_stream_feature_views())
    a = ads_traffic(4000, users=200, rate=400, disorder_s=2.0, seed=41)
    b = ads_traffic(4000, users=200, rate=400, disorder_s=2.0, seed=42,
                    start_us=max(r["ts"] for _, r in a) + 1_000_000)
    c = ads_traffic(1500, users=200, rate=400, disorder_s=2.0, seed=43,
                    start_us=max(r["ts"] for _, r in b) + 1_000_000)
    logs = {w: settings.root / f"streams-{w}.log" for w in "ab"}

    def lines(w: str, what: str) -> list[str]:
        text = logs[w].read_text(errors="replace") if logs[w].exists() else ""
        return [line.split(what, 1)[1] for line in text.splitlines() if what in line]

    with worker(settings, "streams", log_name="streams-a") as proc_a:
        publish(settings, a)
        wait_streamed(settings, a, views, alive=proc_a)
        with worker(settings, "streams", log_name="streams-b") as proc_b:
            wait_for(lambda: lines("b", RECOVERED) and len(lines("a", RECOVERED)) >= 2, 120)
            assert lines("a", ASSIGNED)[-1] != lines("b", ASSIGNED)[-1] != "none"
            _plain_publish(settings, decls, b)
            wait_streamed(settings, a + b, views, alive=proc_b)
            check_exact(settings, store, a + b, views, decls=decls)
            for w in "ab":
                assert "routing them through" in logs[w].read_text(errors="replace"), f"worker {w} routed nothing"
        publish(settings, c)
        wait_streamed(settings, a + b + c, views, alive=proc_a)
    check_exact(settings, store, a + b + c, views, decls=decls)

    n = settings.partitions
    router = Router(settings, decls)
    moved = sum(_crc32_partition(str(r["user_id"]).encode(), n) != router.partition(str(r["user_id"]).encode())
                for _, r in b)
    copies = sum(sum(end_offsets(settings, repartition_topic(t)).values()) for t in decls.topics)
    assert 0 < moved == copies, "each misplaced record is routed exactly once"
