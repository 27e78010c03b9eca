"""The one Kafka client configuration factory, with settings that are safe on the embedded broker.

Tansu (ARCHITECTURE.md) holds every fetch for its max wait and assigns a group after about half the
session timeout, so consumers use a short fetch wait and a 6 s session. Producers use the murmur2
partitioner so confluent-kafka and aiokafka (Faust) put one key in the same partition.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from driftloop.core.contracts import Event
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 1000
FETCH_WAIT_MS = 50


def bootstrap(settings: Settings) -> str:
    if not settings.bootstrap_servers:
        raise RuntimeError(
            "No Kafka broker configured: set DRIFTLOOP_BOOTSTRAP_SERVERS or start the embedded stack "
            "with `driftloop up` (which sets it for its workers)."
        )
    return settings.bootstrap_servers


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap(settings),
        "partitioner": "murmur2_random",
        "enable.idempotence": False,
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        "message.max.bytes": 1_000_000,
        **extra,
    }


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": SESSION_TIMEOUT_MS,
        "heartbeat.interval.ms": HEARTBEAT_MS,
        "fetch.wait.max.ms": FETCH_WAIT_MS,
        "partition.assignment.strategy": "range",
        **extra,
    }


class CheckedProducer(Producer):
    """A producer that remembers failed deliveries, so ``flush_or_raise`` never reports them as done."""

    def __init__(self, config: dict[str, Any]):
        self.failed: list[Any] = []
        super().__init__({**config, "on_delivery": self._delivered})

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failed.append(err)


def make_producer(settings: Settings, **extra: Any) -> CheckedProducer:
    return CheckedProducer(producer_config(settings, **extra))


def make_consumer(settings: Settings, group_id: str, topics: Iterable[str], **extra: Any) -> Consumer:
    """A consumer subscribed to logical topic names (the prefix is added here)."""
    c = Consumer(consumer_config(settings, group_id, **extra))
    c.subscribe([settings.topic(t) for t in topics])
    return c


def faust_broker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword settings for ``faust.App`` that match the Kafka clients above."""
    return {
        "broker": "kafka://" + bootstrap(settings).replace(",", ";kafka://"),
        "broker_session_timeout": SESSION_TIMEOUT_MS / 1000,
        "broker_heartbeat_interval": HEARTBEAT_MS / 1000,
        "broker_request_timeout": 30,
        "broker_commit_every": 5000,
        "broker_commit_interval": 1.0,
        "consumer_auto_offset_reset": "earliest",
        "producer_partitioner": None,
        "producer_acks": -1,
        "topic_partitions": settings.partitions,
        "topic_replication_factor": settings.replication_factor,
        "datadir": str(settings.data_dir / "faust"),  # Faust's default is a folder in the cwd
    }


def produce_event(producer: Producer, settings: Settings, topic: str, event: Event, key: str) -> None:
    """Produce one contract record to a logical topic, waiting for queue room if needed."""
    produce_raw(producer, settings.topic(topic), key.encode(), event.to_bytes())


def produce_raw(producer: Producer, topic: str, key: bytes | None, value: bytes | None, **kw: Any) -> None:
    """Produce one record to a full topic name, waiting for queue room if needed."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, **kw)
            return
        except BufferError:
            producer.poll(0.01)


def good_messages(messages: list[Message]) -> list[Message]:
    """Drop partition-EOF markers; raise on real consumer errors."""
    out = []
    for m in messages:
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", err)
    return out


def flush_or_raise(producer: Producer, timeout: float = 30.0) -> None:
    """Wait until every queued record is acknowledged by the broker; raise if any delivery failed."""
    left = producer.flush(timeout)
    if left:
        raise RuntimeError(f"{left} records not acknowledged by the broker within {timeout}s")
    failed = getattr(producer, "failed", None)
    if failed:
        n, first = len(failed), failed[0]
        failed.clear()
        raise RuntimeError(f"{n} records not delivered: {first}")


def read_past_reported_end(settings: Settings, topic: str, partitions: Iterable[int],
                           idle_polls: int = 3, timeout: float = 60.0) -> Iterator[Message]:
    """The records of ``topic`` (full name) from each partition's reported end − 1 to its real end.

    Tansu reports a partition's end as the base offset of its last record batch + 1 (ARCHITECTURE.md),
    so a reader that stops at the reported end misses the rest of that batch; this reads it. It ends
    once the record at reported end − 1 of every partition arrived and ``idle_polls`` polls in a row
    brought nothing; ``TimeoutError`` if those records do not arrive within ``timeout``."""
    c = Consumer(consumer_config(settings, f"{settings.topic_prefix}tail-{uuid.uuid4().hex[:8]}"))
    try:
        tps, pending = [], {}
        for p in partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, max(lo, hi - 1)))
            if hi > lo:
                pending[p] = hi - 1
        if not tps:
            return
        c.assign(tps)
        empty, deadline = 0, time.monotonic() + timeout
        while pending or empty < idle_polls:
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: records at {pending} did not arrive within {timeout}s")
            msgs = good_messages(c.consume(10_000, 0.2))
            empty = 0 if msgs else empty + 1
            for m in msgs:
                if m.offset() >= pending.get(m.partition(), m.offset() + 1):
                    del pending[m.partition()]
                yield m
    finally:
        c.close()
