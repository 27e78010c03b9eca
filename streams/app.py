"""The streams worker: a Faust app over every declared topic (``driftloop apply``'s declarations) that
validates each record against its topic's schema, runs the Feast stream feature views of the registry
and joins each model's labels.

Per micro-batch (one fetch round, see ``faust_patches.route_batches``): the engine (``engine.py``)
validates, de-duplicates, aggregates and joins labels, and the batch's online rows are written at once, on
their own thread while the next batch is computed (one batch's at a time, in order; monotonic: a replay never
moves a value back). Every ``streams_commit_s`` (and before a rebalance or a
restart) the batches since the last commit are committed: this app writes, in order, their Delta rows (in
parallel, idempotent by source offsets), then the newest state record of each entity they touched
(changelog), labels and dead letters, and flushes. Only then are their records acked, and Faust's commit
loop commits acked offsets, so offsets never run ahead of durable writes. A commit is written in the
background while later batches are processed (its state records serialised when it is taken; one commit
written at a time, in order, each after its batches' online rows). Committing several batches at once
makes fewer, larger Delta commits and writes a busy entity's state record once, not once per batch. A batch
or commit that fails stops the worker (the supervisor restarts it) rather than committing past it. When the
declarations change, the worker finishes its batch, commits, stops and exits with ``RESTART_EXIT`` (the
supervisor starts it again).

Producers as they are: the partition that owns an entity (its state, its changelog partition, its label
joins) is the one Java's murmur2 partitioner picks for its key, as driftloop's producers do. A record that
another partitioner put elsewhere (librdkafka's default ``consistent_random``: kcat, confluent-kafka) is not
processed where it lands: ``Router`` produces a copy to that partition of ``<topic>.repartition`` (same
partition count, so the same worker owns both; header ``driftloop-origin`` = source partition:offset), and
the original is acked with its batch, after the copy is acknowledged. The copy is processed as the logical
topic on virtual partition ``n·(1+p)+q`` (``n`` partitions, source partition ``p``, owner ``q``; ``% n`` is
``q``) at its SOURCE offset: one stream per (p, q) in source order, so a copy routed twice (a restart before
the original's commit) is a replay the engine's offset checks skip, and rows keep ``_topic`` = the source
topic, ``_offset`` = the source offset (``_partition`` ≥ n marks a routed record). With two workers each
owning some partitions, an entity's records all meet on its owner.

Output records go through one confluent-kafka producer (about 1 µs a record against several hundred
through Faust's producer here); changelog records are written exactly as Faust's table would write
them (JSON key and value, the source partition), so Faust's table recovery reads them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka.admin import AdminClient
from faust.types import TP

from driftloop.core.deadletter import letter
from driftloop.core.declarations import Declarations
from driftloop.core.kafka import (
    bootstrap,
    faust_broker_settings,
    flush_or_raise,
    make_producer,
    produce_raw,
    read_past_reported_end,
)
from driftloop.core.metrics import (
    BATCH_SIZE,
    CONSUMER_LAG,
    DLQ,
    EVENTS_IN,
    LABELS,
    LATE_OUTCOMES,
    StoreHealth,
    beat,
    serve_metrics,
)
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.features import windows
from driftloop.features.online_write import OnlineSink
from driftloop.features.repo import declarations, open_store
from driftloop.streams import faust_patches, seed
from driftloop.streams.engine import LABELS_TABLE, BatchOutput, FeatureEngine, Record
from driftloop.streams.sinks import LabelSink, OfflineSink

log = logging.getLogger(__name__)

REPARTITION = ".repartition"
ORIGIN = "driftloop-origin"  # header of a routed copy: b"<source partition>:<source offset>"
Produce = Callable[[str, bytes | None, bytes | None, int, list[tuple[str, bytes]]], None]
# An entity's state record holds its label joins in progress; when one topic is read far ahead of another
# (a backlog: outcomes fetched long before their scored events) a busy entity's record passes Kafka's usual
# 1 MB. The changelog takes records up to this size (its topic config, for real clusters, and the producer's).
STATE_RECORD_MAX_BYTES = 64 * 2**20
STATE_RECORD_WARN_BYTES = 2**20
COMMIT_RECORDS = 100_000  # a commit comes sooner than streams_commit_s once this many records wait


class Pending:
    """The batches computed since the last commit: their output merged (rows, state records, dead letters,
    labels), the callbacks that ack their records and the online write of the last one (each batch's starts once
    the one before it has landed, so it stands for them all)."""

    def __init__(self) -> None:
        self.out = BatchOutput()
        self.done: list[Callable[[], None]] = []
        self.records = 0
        self.since = 0.0
        self.online: asyncio.Future[None] | None = None

    def add(self, out: BatchOutput, done: Callable[[], None], online: asyncio.Future[None] | None = None) -> None:
        if not self.done:
            self.since = time.monotonic()
        self.out.merge(out)
        self.done.append(done)
        self.records += out.accepted + len(out.dlq) + out.skipped
        self.online = online

    def due(self, every_s: float) -> bool:
        """Whether to commit now: the oldest batch waited ``every_s``, or the rows make a large Delta commit."""
        return bool(self.done) and (time.monotonic() - self.since >= every_s or self.records >= COMMIT_RECORDS)

    def take(self) -> tuple[BatchOutput, list[Callable[[], None]], int, asyncio.Future[None] | None]:
        taken = self.out, self.done, self.records, self.online
        self.out, self.done, self.records, self.online = BatchOutput(), [], 0, None
        return taken


class Collector:
    """Keeps Python's garbage collector off the long-lived state. Each batch leaves entity records and window
    buckets behind, which every later collection would walk again (about a quarter of the engine's time, in a
    throwaway measurement); they are frozen after each batch (``gc.freeze``), and everything is collected once
    every ``full_every_s``, so cyclic garbage is still reclaimed."""

    def __init__(self, full_every_s: float = 300.0):
        self.full_every_s = full_every_s
        self.last_full = time.monotonic()

    def batch_done(self) -> None:
        if time.monotonic() - self.last_full >= self.full_every_s:
            gc.unfreeze()
            gc.collect()
            self.last_full = time.monotonic()
        gc.freeze()


def repartition_topic(topic: str) -> str:
    """The internal topic (logical name) that routes ``topic``'s misplaced records to their owner partition."""
    return topic + REPARTITION


class Router:
    """Routes each source record to the partition murmur2 gives its key (module docstring, "Producers as
    they are"); a record without a key goes by its value's entity field."""

    CACHE = 200_000  # keys whose partition is remembered (murmur2 in Python takes microseconds)

    def __init__(self, settings: Settings, decls: Declarations):
        self.n = settings.partitions
        self.source = {settings.topic(t): t for t in decls.topics}  # full name → logical topic
        self.copies = {settings.topic(repartition_topic(t)): t for t in decls.topics}
        self.copy_topic = {t: settings.topic(repartition_topic(t)) for t in decls.topics}
        self.key_field = {t: spec.key for t, spec in decls.topics.items()}
        self.routed: Counter[str] = Counter()
        self._partition: dict[bytes, int] = {}

    @property
    def topics(self) -> list[str]:
        """Every full topic name the worker consumes: the declared topics and their repartition topics."""
        return sorted([*self.source, *self.copies])

    def partition(self, key: bytes) -> int:
        """Java's default partition of ``key`` (murmur2, as librdkafka's ``murmur2_random``)."""
        q = self._partition.get(key)
        if q is None:
            if len(self._partition) >= self.CACHE:
                self._partition.clear()
            q = self._partition[key] = (murmur2(key) & 0x7FFFFFFF) % self.n
        return q

    def source_partition(self, partition: int) -> int:
        """The source partition of a record the engine saw on ``partition`` (virtual for a routed copy)."""
        return partition // self.n - 1 if partition >= self.n else partition

    def _entity(self, topic: str, value: bytes | None) -> bytes | None:
        try:
            return str(orjson.loads(value or b"")[self.key_field[topic]]).encode()
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None  # invalid: processed where it is, and dead-lettered by the engine

    def records(self, messages: list[Any], produce: Produce) -> list[Record]:
        """The engine's records of a batch of consumed messages; misplaced source records are produced to
        their repartition topic instead (``produce(topic, key, value, partition, headers)``)."""
        out = []
        for m in messages:
            topic = self.source.get(m.topic)
            if topic is None:  # a routed copy
                topic = self.copies[m.topic]
                origin = next((v for k, v in reversed(m.headers or ()) if k == ORIGIN), None)
                try:
                    p, o = map(int, origin.split(b":"))  # type: ignore[union-attr]
                except (AttributeError, ValueError):
                    log.warning("%s[%d]@%d has no %s header: skipped", m.topic, m.partition, m.offset, ORIGIN)
                    continue
                out.append(Record(topic, self.n * (1 + p) + m.partition, o, m.key, m.value))
                continue
            key = m.key if m.key is not None else self._entity(topic, m.value)
            q = m.partition if key is None else self.partition(key)
            if q == m.partition:
                out.append(Record(topic, m.partition, m.offset, m.key, m.value))
                continue
            if not self.routed[topic]:
                log.info("records of %s arrive on other partitions than murmur2 puts their key (a producer with "
                         "another partitioner, e.g. librdkafka's default consistent_random): routing them through "
                         "%s to the partition that owns their entity", topic, self.copy_topic[topic])
            produce(self.copy_topic[topic], m.key, m.value, q,
                    [*(m.headers or ()), (ORIGIN, b"%d:%d" % (m.partition, m.offset))])
            self.routed[topic] += 1
        return out


def _check_partitions(settings: Settings, topics: list[str]) -> None:
    """Every consumed topic must have the changelog's partition count: partition q of each is one owner."""
    meta = AdminClient({"bootstrap.servers": bootstrap(settings)}).list_topics(timeout=30).topics
    wrong = {t: len(meta[t].partitions) for t in topics if t in meta and len(meta[t].partitions) != settings.partitions}
    if wrong:
        raise ValueError(f"the streams worker needs {settings.partitions} partitions (settings.partitions) in every "
                         f"topic it consumes; these differ: {wrong}")


class Restart:
    """Set when ``driftloop apply`` wrote new declarations: the worker stops after its batch and exits
    with ``RESTART_EXIT`` so the supervisor starts it on the new topics, views and models."""

    requested = False

    @classmethod
    def request(cls) -> None:
        if not cls.requested:
            cls.requested = True
            os.kill(os.getpid(), signal.SIGTERM)  # Faust's own graceful stop


def create_app(settings: Settings) -> faust.App:
    faust_patches.apply()
    declarations(settings)  # applies the repo if it never was
    watch = DeclarationsWatch(settings)
    decls = Declarations.load(settings.declarations_file)  # read after the watch's stamp: a change is seen
    ensure_topics(settings)
    router = Router(settings, decls)
    ensure_topics(settings, [repartition_topic(t) for t in sorted(decls.topics)])
    _check_partitions(settings, router.topics)
    store = open_store(settings)
    views = windows.specs_from_feast(store.list_stream_feature_views())
    log.info("topics: %s; stream feature views: %s; models: %s", ", ".join(decls.topics),
             ", ".join(f"{v.name} ({v.topic})" for v in views) or "none",
             ", ".join(f"{m.name} ({m.label.kind} label from {m.label.topic})" for m in decls.models.values())
             or "none")
    engine = FeatureEngine(views, decls, max_future_s=settings.max_future_s)

    app = faust.App(
        f"{settings.topic_prefix}streams",
        web_enabled=False,
        store="memory://",
        stream_wait_empty=False,
        table_standby_replicas=0,
        # Tansu reports a partition's end as its last batch's base offset + 1 (ARCHITECTURE.md), below the
        # changelog offsets Faust's recovery already read (whole batches): Faust's check that they are below
        # the end crashed the worker on its next recovery in the same process (any rebalance after one with data)
        recovery_consistency_check=False,
        **faust_broker_settings(settings),
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(*router.topics, **raw)
    dlq, labels_topic = settings.topic("dlq"), settings.topic("labels")
    state = app.Table("feature-state", default=None, partitions=settings.partitions,
                      extra_topic_configs={"max.message.bytes": str(STATE_RECORD_MAX_BYTES)})
    changelog = state.changelog_topic.get_topic_name()
    producer = make_producer(settings, **{"linger.ms": 2, "message.max.bytes": STATE_RECORD_MAX_BYTES + 2**16})
    large: set[str] = set()  # entities whose state record passed STATE_RECORD_WARN_BYTES (logged once)
    collector = Collector()

    # the idempotency marks name the broker's cluster: an embedded broker restarted empty (new id, offsets from 0
    # again) must not have its records taken for ones already written; a real cluster keeps its id
    cluster = producer.list_topics(timeout=30).cluster_id or "kafka"
    offline_sink = OfflineSink(settings.offline_dir, app=f"streams@{cluster}")
    labels_sink = LabelSink(settings.offline_dir, app=f"streams@{cluster}", table=LABELS_TABLE)
    online = OnlineSink(store)
    seed_sink = OfflineSink(settings.offline_dir, app="seed")  # its own offsets: never hides a stream row
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sink")
    online_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="online")  # never queued behind Delta
    fresh_assignment = True

    batch_lock = asyncio.Lock()  # held while a batch is processed or a commit is taken
    pending = Pending()  # batches computed, their online rows written (the last one's maybe still), not committed
    writing: list[asyncio.Task[None]] = []  # the commit being written (at most one: commits land in order)
    online_write: asyncio.Future[None] | None = None  # the last batch's online write (at most one in flight)

    @app.on_partitions_revoked.connect
    async def _revoked(app: faust.App, revoked: Any, **kwargs: Any) -> None:
        # Faust awaits this before it commits and recovers the tables: let the batch in flight finish
        # (state, changelog, ack), or recovery could read a changelog end from before its flush and
        # overwrite the newer state in memory with older records.
        async with batch_lock:
            await _commit(wait=True)

    @app.on_partitions_assigned.connect
    async def _assigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        nonlocal fresh_assignment
        fresh_assignment = True
        log.info("partitions assigned: %s", ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned
                                                              if tp.topic in source.topics)) or "none")

    @app.on_rebalance_complete.connect
    async def _recovered(app: faust.App, **kwargs: Any) -> None:
        log.info("table recovered, resuming the streams")

    async def process(messages: list[Any], done: Callable[[], None]) -> None:
        """One fetch round of source records (see ``faust_patches.route_batches``); ``done`` acks them."""
        nonlocal fresh_assignment
        try:
            async with batch_lock:
                if fresh_assignment:
                    await _commit(wait=True)
                    parts = {tp.partition for tp in app.consumer.assignment() if tp.topic in source.topics}
                    n = await asyncio.get_running_loop().run_in_executor(None, _recover_tail, sorted(parts))
                    log.info("state: %d keys after recovery (%d changelog records re-read past the reported end)",
                             len(state.data), n)
                    engine.reset(state.data.items())
                    offline_sink.reset()
                    floors = engine.label_floors(_owned(sorted(parts)), state.data.get)
                    await asyncio.get_running_loop().run_in_executor(None, labels_sink.reset, floors)
                    await asyncio.get_running_loop().run_in_executor(None, _seed_new_views, sorted(parts))
                    fresh_assignment = False
                await _process_batch(messages, done)
                if pending.due(settings.streams_commit_s):
                    await _commit()
                collector.batch_done()
                if watch.changed():
                    await _commit(wait=True)
                    Restart.request()
        except Exception:
            log.exception("batch of %d records failed; stopping so nothing is committed past it", len(messages))
            os._exit(70)

    async def _process_batch(messages: list[Any], done: Callable[[], None]) -> None:
        nonlocal online_write
        BATCH_SIZE.labels(component="streams").observe(len(messages))
        assigned = app.consumer.assignment()
        records = router.records([m for m in messages if m.tp in assigned], _route)  # a record of a partition
        # revoked meanwhile is the new owner's
        for m in messages:
            consumed[m.tp] = m.offset
        t0 = time.perf_counter()
        out = engine.process(records, state.data.get, caught_up=_caught_up)
        t1 = time.perf_counter()
        for topic in {r.topic for r in records}:
            EVENTS_IN.labels(component="streams", topic=topic).inc(sum(r.topic == topic for r in records))
        last = {m.tp: m.offset for m in messages}
        for tp, off in last.items():
            with contextlib.suppress(Exception):  # the end offset is unknown until the first fetch answer
                CONSUMER_LAG.labels("streams", tp.topic, str(tp.partition)).set(
                    max(0, app.consumer.highwater(tp) - off - 1))
        if online_write is not None:  # the last batch's online rows, written while this batch was computed
            await online_write
        t2 = time.perf_counter()
        # online now (freshness waits for no Delta commit), in order, while the next batch is computed
        online_write = asyncio.ensure_future(_write_stores(out, offline=False))
        for key, (value, _r) in out.states.items():
            state.data[key] = value  # the next batch's engine reads it (a new entity's record is new here)
        pending.add(out, done, online_write)
        log.debug("batch %d records: engine %.3fs, waited for the last online write %.3fs", len(records), t1 - t0,
                  t2 - t1)

    async def _commit(wait: bool = False) -> None:
        """Take the batches since the last commit and write them in the background while later batches are
        processed: their state records are serialised now (the newest value of each, before a later batch
        changes it), then, in order (module docstring), Delta rows, state records, dead letters and labels, a
        flush, and only then their acks. One commit is written at a time, so they land in order. ``wait``:
        return once every commit taken is acked (a rebalance, a restart). A failure stops the worker (from a
        batch, the timer or a rebalance alike): nothing is committed past it."""
        if writing:
            await _settle()
        if pending.done:
            out, dones, n, online_done = pending.take()
            try:
                records = [(key, _state_record(key, value), r.partition) for key, (value, r) in out.states.items()]
            except Exception:
                log.exception("commit failed; stopping so nothing is committed past it")
                os._exit(70)
            writing.append(asyncio.ensure_future(_write_pending(out, records, dones, n, online_done)))
        if wait:
            await _settle()

    async def _settle() -> None:
        """Wait for the commit being written (acked once this returns)."""
        while writing:
            await writing[0]
            writing.pop(0)

    async def _write_pending(out: BatchOutput, records: list[tuple[str, bytes, int]], dones: list[Callable[[], None]],
                             n: int, online_done: asyncio.Future[None] | None) -> None:
        try:
            if online_done is not None:  # its batches' online rows first (nothing is acked before them)
                await online_done
            await _write_committed(out, records, dones, n)
        except Exception:
            log.exception("commit failed; stopping so nothing is committed past it")
            os._exit(70)

    async def _write_committed(out: BatchOutput, records: list[tuple[str, bytes, int]],
                               dones: list[Callable[[], None]], n: int) -> None:
        t0 = time.perf_counter()
        await _write_stores(out, online=False)
        t1 = time.perf_counter()
        for key, raw, partition in records:
            produce_raw(producer, changelog, orjson.dumps(key), raw, partition=partition % router.n)
        for r, reason, detail in out.dlq:
            headers = {"error": detail, "reason": reason, "source_topic": settings.topic(r.topic),
                       "partition": str(router.source_partition(r.partition)), "offset": str(r.offset)}
            value, headers = letter(r.value, headers)
            produce_raw(producer, dlq, r.key, value, headers=headers)
        for lb, _r in out.labels:
            produce_raw(producer, labels_topic, lb.key.encode(), lb.to_bytes())
        t2 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(None, flush_or_raise, producer)
        t3 = time.perf_counter()
        for done in dones:
            done()
        _count(out)
        beat("streams", progressed=True)
        log.debug("commit of %d batches, %d records: Delta %.3fs, state %.3fs, flush %.3fs (%d keys)", len(dones),
                  n, t1 - t0, t2 - t1, t3 - t2, len(out.states))

    consumed: dict[Any, int] = {}  # the last offset processed per source topic-partition (full name)
    full = {t: settings.topic(t) for t in decls.topics}

    def _caught_up(topic: str, partition: int) -> bool:
        """Whether every record the broker holds of ``topic``'s partition owning ``partition`` (and of its
        routed copies) has been processed: a join may close by the scored topic's watermark only then, or a
        backlog's scored events would close before their outcomes are read."""
        q = partition % router.n
        for name, saved in ((full[topic], engine.ends.get((topic, q), -1)),
                            (router.copy_topic[topic], -1)):
            tp = TP(name, q)
            try:
                end = app.consumer.highwater(tp)
            except Exception:  # noqa: BLE001 (not assigned or not fetched yet: unknown)
                return False
            if end is None or (end > 0 and max(consumed.get(tp, -1), saved) + 1 < end):
                return False
        return True

    def _owned(partitions: list[int]) -> list[int]:
        """The engine's partitions of these source partitions: each one and the virtual ones of its routed
        copies."""
        n = router.n
        return [vp for q in partitions for vp in (q, *(n * (1 + p) + q for p in range(n)))]

    stores = {store: StoreHealth("streams", store, f"{store} store write failed (retrying; no offset is committed "
                                                   "until it succeeds)", f"{store} store writes succeed again", log)
              for store in ("offline", "online")}

    async def _write_stores(out: BatchOutput, online: bool = True, offline: bool = True) -> None:
        """The batch's online and/or Delta rows, retried with backoff while a store fails: every write is
        idempotent, and nothing after it (state, offsets) happens until all succeeded."""
        loop, delay = asyncio.get_running_loop(), 0.5
        while True:
            jobs = [("online", loop.run_in_executor(online_pool, _write_online, out))] if online else []
            for name, cols in out.offline.items() if offline else ():
                sink = labels_sink if name == LABELS_TABLE else offline_sink
                jobs.append(("offline", loop.run_in_executor(pool, sink.write, name, cols, out.offsets)))
            results = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
            failed = {store: r for (store, _), r in zip(jobs, results, strict=True) if isinstance(r, BaseException)}
            for store in {store for store, _ in jobs}:
                if store in failed:
                    stores[store].failed(failed[store])
                else:
                    stores[store].ok()
            if not failed:
                return
            if "offline" in failed:  # (only a commit writes them: no write of theirs is in flight here)
                offline_sink.reset()  # table handles and recorded offsets are read again
                labels_sink.reset()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _route(topic: str, key: bytes | None, value: bytes | None, partition: int,
               headers: list[tuple[str, bytes]]) -> None:
        produce_raw(producer, topic, key, value, partition=partition, headers=headers)

    app.topics.add(source)
    faust_patches.route_batches(source.topics, process)

    def _save(key: str, value: Any, partition: int) -> None:
        """A state record, in memory and on the changelog partition that owns it (flushed by the caller)."""
        state.data[key] = value
        produce_raw(producer, changelog, orjson.dumps(key), _state_record(key, value), partition=partition % router.n)

    def _state_record(key: str, value: Any) -> bytes:
        """The changelog value of a state record (refused over the record limit, logged once over the warning
        size)."""
        raw = orjson.dumps(value)
        if len(raw) > STATE_RECORD_WARN_BYTES and key not in large:
            large.add(key)
            parts = ", ".join(f"{p} {len(orjson.dumps(v)) / 2**20:.1f} MiB" for p, v in value.items())
            log.warning("state of %s is %.1f MiB (%s): label joins wait for events of a topic read behind the "
                        "others", key, len(raw) / 2**20, parts)
        if len(raw) > STATE_RECORD_MAX_BYTES:
            raise RuntimeError(f"state of {key} is {len(raw) / 2**20:.0f} MiB, over the changelog's "
                               f"{STATE_RECORD_MAX_BYTES / 2**20:.0f} MiB record limit")
        return raw

    def _seed_new_views(partitions: list[int]) -> None:
        """Views the state of these partitions does not cover yet start from their topics' bronze rows
        (``seed.py``): offline rows, then online rows, state records and the marker, then a flush."""
        todo = seed.missing_views(engine.by_topic, dict.fromkeys(engine.by_topic, partitions), state.data.get)
        for (topic, q), views in sorted(todo.items()):
            t0, n = time.perf_counter(), 0
            for p, chunks in seed.bronze_rows(settings.offline_dir, topic, q, router.n):
                for out in engine.seed(topic, p, views, chunks, state.data.get):
                    for name, cols in out.offline.items():
                        seed_sink.write(name, cols, out.offsets)
                    _write_online(out)
                    for key, (value, r) in out.states.items():
                        _save(key, value, r.partition)
                    n += out.accepted
            mark = seed.marker(topic, q)
            names = sorted({v.name for v in views} | set((state.data.get(mark) or {}).get("views", ())))
            _save(mark, {"views": names}, q)
            flush_or_raise(producer)
            if n:
                log.info("%s[%d]: views %s seeded from %d bronze events in %.1fs", topic, q,
                         ", ".join(v.name for v in views), n, time.perf_counter() - t0)

    def _recover_tail(partitions: list[int]) -> int:
        """Re-read each changelog partition from its reported end minus one to its real end.

        Tansu reports a partition's end as the base offset of its last record batch + 1, so Faust's
        recovery stops short of the newest batch of state records; they are applied here."""
        n = 0
        for m in read_past_reported_end(settings, changelog, partitions):
            key = orjson.loads(m.key())
            if m.value() is None:
                state.data.pop(key, None)
            else:
                state.data[key] = orjson.loads(m.value())
            n += 1
        return n

    unlabelled: Counter[str] = Counter()  # model → scored events that got no label (no outcome in the window)
    last_unlabelled_log = [0.0]

    def _count(out: BatchOutput) -> None:
        for (topic, reason), n in Counter((r.topic, reason) for r, reason, _detail in out.dlq).items():
            DLQ.labels(component="streams", topic=topic, reason=reason).inc(n)
        for model, n in Counter(lb.model_name for lb, _r in out.labels).items():
            LABELS.labels(model=model).inc(n)
        for model, n in out.late_outcomes.items():
            LATE_OUTCOMES.labels(model=model).inc(n)
        unlabelled.update(out.unlabelled)
        if unlabelled and time.monotonic() - last_unlabelled_log[0] >= 60:
            last_unlabelled_log[0] = time.monotonic()
            log.info("scored events without an outcome in their label window (no label) so far: %s",
                     dict(unlabelled))

    def _write_online(out: BatchOutput) -> None:
        for name, rows in out.online.items():
            online.write(name, rows)

    @app.task
    async def _ready() -> None:
        serve_metrics(settings.metrics_port, "streams", settings.metrics_host)
        mark_ready(settings, "streams")

    @app.timer(interval=watch.every_s)
    async def _watch() -> None:  # an idle worker sees new declarations too
        beat("streams")
        async with batch_lock:
            if watch.changed():
                await _commit(wait=True)
                Restart.request()

    @app.timer(interval=0.1)
    async def _commit_due() -> None:  # traffic that stops is committed too
        if pending.due(settings.streams_commit_s) and not batch_lock.locked():
            async with batch_lock:
                await _commit()

    return app


def _wait_for_topics(settings: Settings) -> None:
    """Nothing is declared: idle until ``driftloop apply`` writes declarations, then ask for a restart."""
    log.warning("no declared topics in %s: waiting for `driftloop apply`", settings.declarations_file)
    serve_metrics(settings.metrics_port, "streams", settings.metrics_host)
    mark_ready(settings, "streams")
    watch, stop = DeclarationsWatch(settings), StopFlag()
    while not stop:
        if watch.changed():
            raise SystemExit(RESTART_EXIT)
        time.sleep(0.5)


def run(settings: Settings) -> None:
    """Run the streams worker until SIGTERM/SIGINT, or until new declarations (exit ``RESTART_EXIT``)."""
    if not declarations(settings).topics:
        _wait_for_topics(settings)
        return
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if Restart.requested:
            log.info("exiting with %d to restart on the new declarations", RESTART_EXIT)
            raise SystemExit(RESTART_EXIT) from None
        raise
