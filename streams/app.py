"""The streams worker: a Faust app that validates events, computes Feast stream feature views,
joins labels, and writes the online store, the Delta offline store and the ``labels`` topic.

Per batch (``take_events``): parse → dead-letter bad records → update window state → write Delta
(idempotent by source offsets) → write online → send labels/dlq → flush; Faust commits the batch's
offsets only after that (events are acked when the next batch is taken, the producer is flushed first).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import defaultdict
from typing import Any

import aiokafka
import faust
from faust.streams import _current_event

from driftloop.features.repo import open_store
from driftloop.infra.contracts import Click, Impression, Label
from driftloop.infra.kafka import FETCH_WAIT_MS, faust_broker_settings
from driftloop.infra.metrics import BATCH_SIZE, DLQ, EVENTS_IN
from driftloop.infra.settings import Settings
from driftloop.streams import windows
from driftloop.streams.labels import LabelJoiner
from driftloop.streams.sinks import OfflineSink, OnlineSink
from driftloop.streams.validation import Invalid, parse

log = logging.getLogger(__name__)

CONTRACTS = {"events.impressions": Impression, "events.clicks": Click}
BATCH_MAX = 5000
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
    by_topic: dict[str, list[windows.ViewSpec]] = defaultdict(list)
    for v in views:
        by_topic[v.topic].append(v)
    lateness_s = max([v.lateness_s for v in views] + [0.0])

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
    state = app.Table("feature-state", default=dict, partitions=settings.partitions)
    pending = app.Table("label-pending", default=None, partitions=settings.partitions)

    offline = OfflineSink(settings.offline_dir, app="streams")
    online = OnlineSink(store)
    joiner = LabelJoiner(settings.label_window_s)
    watermarks: dict[int, int] = defaultdict(int)

    async def send_dlq(ev: Any, reason: str, detail: str) -> None:
        m = ev.message
        DLQ.labels(reason=reason).inc()
        headers = [("error", detail.encode()), ("reason", reason.encode()), ("source_topic", m.topic.encode()),
                   ("partition", str(m.partition).encode()), ("offset", str(m.offset).encode())]
        await dlq.send(key=m.key, value=m.value, headers=headers)

    @app.agent(source)
    async def process(stream: Any) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            if not joiner.rebuilt:
                joiner.rebuild(pending)
            await _process_batch(events)

    async def _process_batch(events: list[Any]) -> None:
        BATCH_SIZE.labels(component="streams").observe(len(events))
        now_us = time.time_ns() // 1000
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        offsets: dict[tuple[str, int], int] = {}
        touched: dict[str, Any] = {}
        last_event: dict[int, Any] = {}
        cache: dict[str, dict[str, Any]] = {}
        for ev in events:
            m = ev.message
            logical = m.topic[len(settings.topic_prefix):]
            EVENTS_IN.labels(component="streams", topic=logical).inc()
            offsets[(m.topic, m.partition)] = max(offsets.get((m.topic, m.partition), -1), m.offset)
            origin = {"_topic": m.topic, "_partition": m.partition, "_offset": m.offset}
            try:
                rec = parse(m.value, CONTRACTS[logical])
            except Invalid as e:
                await send_dlq(ev, e.reason, e.detail)
                continue
            wm = watermarks[m.partition]
            if wm and rec.ts < wm - int(lateness_s * 1e6):
                await send_dlq(ev, "late", f"ts {rec.ts} older than watermark {wm} - {lateness_s}s")
                continue
            watermarks[m.partition] = max(wm, rec.ts)
            last_event[m.partition] = ev
            _as_current(ev)
            row = rec.model_dump()
            ts_s = rec.ts / 1e6
            for view in by_topic[logical]:
                entity = row[view.entity_key]
                key = f"{view.name}|{entity}"
                st = cache.get(key)
                if st is None:
                    st = cache[key] = dict(state[key] or {})
                windows.update(st, view, row, ts_s)
                touched[key] = ev
                rows[view.name].append({view.entity_key: entity, **windows.values(st, view, ts_s),
                                        "event_timestamp": rec.ts, "created": now_us, **origin})
            rows[f"bronze_{logical.split('.')[-1]}"].append(
                {**row, "event_timestamp": rec.ts, "ingested_at": now_us, **origin})
            if isinstance(rec, Impression):
                joiner.on_impression(pending, rec.event_id, rec.user_id, rec.ts, m.partition)
            else:
                joiner.on_click(pending, rec.impression_id, rec.ts)

        for key, ev in touched.items():
            _as_current(ev)
            view = next(v for v in views if v.name == key.split("|", 1)[0])
            windows.prune(cache[key], view, watermarks[ev.message.partition] / 1e6)
            state[key] = cache[key]

        labels: list[Label] = []
        for p, ev in last_event.items():
            _as_current(ev)
            for iid, st in joiner.due(pending, p, watermarks[p]):
                labels.append(Label(event_id=iid, impression_id=iid, user_id=st["u"], label=st["c"], ts=st["ts"]))
                del pending[iid]
        if labels:
            rows["labels"] = [{**lb.model_dump(), "event_timestamp": lb.ts, "created": now_us,
                               "_topic": "labels", "_partition": 0, "_offset": 0} for lb in labels]

        await asyncio.get_running_loop().run_in_executor(None, _write_stores, rows, offsets)
        for lb in labels:
            await labels_topic.send(key=lb.user_id.encode(), value=lb.to_bytes())
        await app.producer.flush()

    def _write_stores(rows: dict[str, list[dict[str, Any]]], offsets: dict[tuple[str, int], int]) -> None:
        for name, rs in rows.items():
            offline.write(name, rs, offsets)
        for view in views:
            if rows.get(view.name):
                online.write(view.name, rows[view.name], view.entity_key)

    @app.task
    async def _ready() -> None:
        (settings.run_dir / "streams.ready").write_text(str(time.time()))

    return app


def run(settings: Settings) -> None:
    """Run the streams worker until SIGTERM/SIGINT."""
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
