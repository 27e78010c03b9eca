"""The streams worker: a Faust app that runs the Feast stream feature views of the registry.

Per micro-batch (``take_events``): the engine (``engine.py``) validates, de-duplicates and aggregates;
then this app writes, in order, the Delta tables (in parallel, idempotent by source offsets), the
online store, the state records (changelog), the labels and dead letters, and flushes the producer.
Faust acks the batch when the next one is taken and commits acked offsets, so offsets never run
ahead of durable writes. A batch that fails stops the worker (the supervisor restarts it) rather than
committing past it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiokafka
import faust
from faust.streams import _current_event

from driftloop.features.repo import open_store
from driftloop.infra.contracts import Click, Impression
from driftloop.infra.kafka import FETCH_WAIT_MS, faust_broker_settings
from driftloop.infra.metrics import BATCH_SIZE, DLQ, EVENTS_IN, serve_metrics
from driftloop.infra.settings import Settings
from driftloop.streams import windows
from driftloop.streams.engine import BatchOutput, FeatureEngine, LabelRule, Record
from driftloop.streams.sinks import OfflineSink, OnlineSink

log = logging.getLogger(__name__)

CONTRACTS = {"events.impressions": Impression, "events.clicks": Click}
BATCH_MAX = 10_000
BATCH_WITHIN_S = 0.05


class _ShortFetchConsumer(aiokafka.AIOKafkaConsumer):
    """Faust fixes fetch_max_wait_ms at 1500; Tansu holds every fetch that long (ARCHITECTURE.md)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["fetch_max_wait_ms"] = FETCH_WAIT_MS
        super().__init__(*args, **kwargs)


def _as_current(event: Any) -> None:
    """Route the next table write's changelog to ``event``'s partition."""
    _current_event.set(weakref.ref(event))


def create_app(settings: Settings) -> faust.App:
    aiokafka.AIOKafkaConsumer = _ShortFetchConsumer  # type: ignore[misc]
    store = open_store(settings)
    views = windows.specs_from_feast(store.list_stream_feature_views())
    log.info("stream feature views: %s", ", ".join(f"{v.name} ({v.topic})" for v in views) or "none")
    engine = FeatureEngine(views, CONTRACTS, LabelRule(window_s=settings.label_window_s))

    app = faust.App(
        f"{settings.topic_prefix}streams",
        web_enabled=False,
        store="memory://",
        stream_wait_empty=False,
        table_standby_replicas=0,
        **faust_broker_settings(settings),
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(*(settings.topic(t) for t in CONTRACTS), **raw)
    dlq = app.topic(settings.topic("dlq"), **raw)
    labels_topic = app.topic(settings.topic("labels"), **raw)
    state = app.Table("feature-state", default=None, partitions=settings.partitions)

    offline = OfflineSink(settings.offline_dir, app="streams")
    online = OnlineSink(store)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sink")
    prefix_len = len(settings.topic_prefix)
    fresh_assignment = True

    @app.on_partitions_assigned.connect
    async def _assigned(app: faust.App, assigned: Any, **kwargs: Any) -> None:
        nonlocal fresh_assignment
        fresh_assignment = True

    @app.agent(source)
    async def process(stream: Any) -> None:
        nonlocal fresh_assignment
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            if fresh_assignment:
                engine.reset(state.items())
                fresh_assignment = False
            try:
                await _process_batch(events)
            except Exception:
                log.exception("batch of %d records failed; stopping so nothing is committed past it", len(events))
                os._exit(70)

    async def _process_batch(events: list[Any]) -> None:
        BATCH_SIZE.labels(component="streams").observe(len(events))
        records = []
        for ev in events:
            m = ev.message
            records.append(Record(m.topic[prefix_len:], m.partition, m.offset, m.key, m.value, ev))
        out = engine.process(records, state.get)
        for topic in {r.topic for r in records}:
            EVENTS_IN.labels(component="streams", topic=topic).inc(sum(r.topic == topic for r in records))
        loop = asyncio.get_running_loop()
        writes = [loop.run_in_executor(pool, offline.write, name, cols, out.offsets)
                  for name, cols in out.offline.items()]
        writes.append(loop.run_in_executor(pool, _write_online, out))
        await asyncio.gather(*writes)
        for key, (value, r) in out.states.items():
            _as_current(r.source)
            state[key] = value
        for r, reason, detail in out.dlq:
            await _send_dlq(r, reason, detail)
        for lb in out.labels:
            await labels_topic.send(key=lb.user_id.encode(), value=lb.to_bytes())
        await app.producer.flush()

    def _write_online(out: BatchOutput) -> None:
        for name, rows in out.online.items():
            online.write(name, rows)

    async def _send_dlq(r: Record, reason: str, detail: str) -> None:
        DLQ.labels(reason=reason).inc()
        headers = [("error", detail), ("reason", reason), ("source_topic", settings.topic(r.topic)),
                   ("partition", str(r.partition)), ("offset", str(r.offset))]
        await dlq.send(key=r.key, value=r.value, headers=[(k, v.encode()) for k, v in headers])

    @app.task
    async def _ready() -> None:
        serve_metrics(settings.metrics_port)
        (settings.run_dir / "streams.ready").write_text(str(time.time()))

    return app


def run(settings: Settings) -> None:
    """Run the streams worker until SIGTERM/SIGINT."""
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
