"""The one Kafka client configuration factory, with settings that are safe on the embedded broker.

Tansu (ARCHITECTURE.md) holds every fetch for its max wait and assigns a group after about half the
session timeout, so consumers use a short fetch wait and a 6 s session. Producers use the murmur2
partitioner so confluent-kafka and aiokafka (Faust) put one key in the same partition.

Acks: a batch whose offsets are committed afterwards tracks its own records (:class:`Deliveries`), so a
producer can be shared by threads without one thread's flush hiding (or reporting) another's failures.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from driftloop.core.contracts import Event
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

SESSION_TIMEOUT_MS = 6000
HEARTBEAT_MS = 1000
FETCH_WAIT_MS = 50
WAIT_FLUSH_S = 0.01  # Deliveries.wait re-checks its own batch at least this often


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
    """A producer that remembers the failed deliveries of records produced WITHOUT a :class:`Deliveries`
    tracker, for good: ``flush_or_raise`` raises for them on every later call, so no flush (of any thread)
    can make them look delivered. Records produced through a tracker report to that tracker only."""

    def __init__(self, config: dict[str, Any]):
        failed: list[Any] = []

        def delivered(err: Any, _msg: Any) -> None:  # a closure, not a bound method: no reference cycle, so the
            if err is not None:                     # producer (and its librdkafka threads) ends with its last use
                failed.append(err)

        super().__init__({**config, "on_delivery": delivered})
        self.failed = failed


class DeliveryError(RuntimeError):
    """Records were not acknowledged by the broker (failed, or no answer in time)."""


class Deliveries:
    """The broker's answers for ONE batch of records on a (possibly shared) producer.

    Produce the batch through it (``produce``, ``event``), then ``wait()`` before committing what the
    batch covers: it returns once every record of THIS batch is acknowledged and raises
    :class:`DeliveryError` naming the first failure otherwise. Other threads' records on the same
    producer never count, and another thread's flush or poll (which may serve this batch's delivery
    reports) cannot hide a failure: each report is one ``list.append``, atomic under the GIL, and a
    tracker's failures are never cleared. One thread produces into a tracker; ``wait`` may run on
    another (an executor). Use a new tracker per batch.
    """

    __slots__ = ("producer", "sent", "_reports", "_report")

    def __init__(self, producer: Producer):
        self.producer = producer
        self.sent = 0
        reports: list[tuple[Any, str, int] | None] = []  # per answered record: None (acked) or the failure
        append = reports.append

        def report(err: Any, msg: Message) -> None:  # a closure over the list: no reference cycle to self
            append(None if err is None else (err, msg.topic(), msg.partition()))

        self._reports, self._report = reports, report

    def produce(self, topic: str, key: bytes | None, value: bytes | None, **kw: Any) -> None:
        """Produce one record of this batch to a full topic name (``kw``: ``partition``, ``headers``);
        DeliveryError when the client refuses it at once."""
        try:  # the hot path: one call
            self.producer.produce(topic, key=key, value=value, on_delivery=self._report, **kw)
        except BufferError:
            produce_raw(self.producer, topic, key, value, on_delivery=self._report, **kw)
        except KafkaException as e:  # refused at once (e.g. a topic the broker refused before): not in the batch
            raise DeliveryError(f"record for {topic} not accepted: {e}") from e
        self.sent += 1

    def event(self, settings: Settings, topic: str, event: Event, key: str) -> None:
        """Produce one contract record of this batch to a logical topic."""
        self.produce(settings.topic(topic), key.encode(), event.to_bytes())

    @property
    def answered(self) -> int:
        """How many of this batch's records the broker answered for (acked or failed) so far."""
        return len(self._reports)

    def wait(self, timeout: float = 30.0) -> int:
        """Serve the producer's delivery reports until the broker answered for each record of this batch;
        the number of records. Raises DeliveryError if one failed or ``timeout`` s passed first."""
        reports, flush = self._reports, self.producer.flush
        deadline = time.monotonic() + timeout
        while len(reports) < self.sent:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeliveryError(f"{self.sent - len(reports)} of {self.sent} records not acknowledged by the "
                                    f"broker within {timeout}s")
            # flush, not poll: linger.ms is skipped while flushing; it returns early once nothing is in flight
            flush(min(left, WAIT_FLUSH_S))
        failed = self.sent - reports.count(None)
        if failed:
            err, topic, partition = next(r for r in reports if r is not None)
            where = topic if partition is None or partition < 0 else f"{topic} [{partition}]"
            raise DeliveryError(f"{failed} of {self.sent} records not delivered; first: {where}: {err}")
        return self.sent


def make_producer(settings: Settings, **extra: Any) -> CheckedProducer:
    return CheckedProducer(producer_config(settings, **extra))


def make_consumer(settings: Settings, group_id: str, topics: Iterable[str],
                  on_revoke: Callable[[Consumer, list[TopicPartition]], None] | None = None, **extra: Any) -> Consumer:
    """A consumer subscribed to logical topic names (the prefix is added here); ``on_revoke`` runs in the
    polling thread before partitions are taken away (commit what was done for them there)."""
    c = Consumer(consumer_config(settings, group_id, **extra))
    c.subscribe([settings.topic(t) for t in topics], **({"on_revoke": on_revoke} if on_revoke else {}))
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


def produce_raw(producer: Producer, topic: str, key: bytes | None, value: bytes | None, **kw: Any) -> None:
    """Produce one record to a full topic name, waiting for queue room if needed."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, **kw)
            return
        except BufferError:
            producer.poll(0.01)


def produce_all(producer: Producer, records: Iterable[tuple[str, bytes | None, bytes | None,
                                                           dict[str, str] | None]]) -> None:
    """Produce (full topic, key, value, headers) records in order, waiting for queue room where needed (one
    C call per record; ``produce_raw`` only for a record the full queue refused)."""
    produce = producer.produce
    for topic, key, value, headers in records:
        try:
            produce(topic, value, key, headers=headers)
        except BufferError:
            produce_raw(producer, topic, key, value, headers=headers)


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


class LagReporter:
    """Sets ``driftloop_consumer_lag`` for a consumer's assigned partitions every ``every_s`` seconds
    (end offset minus position; the end offsets come from the consumer's fetch responses, with no broker
    round trip: asking the broker took ~50 ms a partition on Tansu and stalled the consumer's loop)."""

    def __init__(self, consumer: Consumer, component: str, every_s: float = 5.0):
        self.consumer, self.component, self.every_s = consumer, component, every_s
        self._next = time.monotonic() + every_s

    def maybe_report(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        from driftloop.core.metrics import CONSUMER_LAG  # noqa: PLC0415 - keep this module free of metrics

        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    CONSUMER_LAG.labels(self.component, tp.topic, str(tp.partition)).set(max(0, high - tp.offset))
        except KafkaException as e:
            log.debug("consumer lag not measured: %s", e)


def flush_or_raise(producer: Producer, timeout: float = 30.0) -> None:
    """Wait until every queued record of the producer (all threads') is acknowledged; raise if any record
    produced on it without a :class:`Deliveries` tracker ever failed. For a producer one thread uses; on a
    shared producer, give each batch a tracker and ``wait`` on it instead."""
    left = producer.flush(timeout)
    if left:
        raise DeliveryError(f"{left} records not acknowledged by the broker within {timeout}s")
    failed = getattr(producer, "failed", None)
    if failed:
        raise DeliveryError(f"{len(failed)} records not delivered on this producer so far; first: {failed[0]}")


# the group moved on without this member (its session expired, e.g. during a broker outage): the commit is
# refused, and the partitions' next owner (possibly this consumer, after it rejoins) starts at the last commit
GROUP_MOVED_ON = {KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS}


def _warn_moved_on(name: str, err: KafkaError) -> None:
    log.warning("%s: commit refused, the consumer group moved on without this member (%s): the records since the "
                "last commit will be consumed again", name, err.str())


class CommitErrors:
    """The ``on_commit`` callback of a consumer that also commits without waiting for the answer: a commit the
    group refused, having moved on without this member, is a warning (as in ``commit_or_warn``); any other
    failure is kept, and ``check()``, called by the consuming thread, raises it."""

    def __init__(self, name: str):
        self.name = name
        self.error: KafkaException | None = None

    def __call__(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        for e in [err, *(p.error for p in partitions or ())]:
            if e is None or e.code() == KafkaError._NO_OFFSET:
                continue
            if e.code() in GROUP_MOVED_ON:
                _warn_moved_on(self.name, e)
            elif self.error is None:
                self.error = KafkaException(e)

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def commit_or_warn(consumer: Consumer, name: str, **kwargs: Any) -> bool:
    """Commit synchronously (``Consumer.commit`` arguments); when the group moved on without this member, log
    it and return False: the records since the last commit are consumed again (at least once), and the
    worker carries on (its next poll rejoins the group). Any other failure raises."""
    try:
        consumer.commit(asynchronous=False, **kwargs)
    except KafkaException as e:
        err = e.args[0] if e.args else None
        if not isinstance(err, KafkaError) or err.code() not in GROUP_MOVED_ON:
            raise
        _warn_moved_on(name, err)
        return False
    return True


def read_past_reported_end(settings: Settings, topic: str, partitions: Iterable[int],
                           idle_polls: int = 3, timeout: float = 60.0,
                           from_time_ms: int | None = None) -> Iterator[Message]:
    """The records of ``topic`` (full name) from each partition's reported end − 1 (or, with
    ``from_time_ms``, from its first record published at or after that time) to its real end.

    Tansu reports a partition's end as the base offset of its last record batch + 1 (ARCHITECTURE.md),
    so a reader that stops at the reported end misses the rest of that batch; this reads it. It ends
    once the record at reported end − 1 of every partition arrived and ``idle_polls`` polls in a row
    brought nothing; ``TimeoutError`` if those records do not arrive within ``timeout``."""
    c = Consumer(consumer_config(settings, f"{settings.topic_prefix}tail-{uuid.uuid4().hex[:8]}"))
    try:
        parts = list(partitions)
        at = {} if from_time_ms is None else {tp.partition: tp.offset for tp in c.offsets_for_times(
            [TopicPartition(topic, p, max(from_time_ms, 0)) for p in parts], timeout=10)}
        tps, pending = [], {}
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            start = max(lo, hi - 1) if from_time_ms is None else max(lo, at[p] if at[p] >= 0 else hi)
            tps.append(TopicPartition(topic, p, start))
            if hi > start:
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
