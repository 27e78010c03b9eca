"""The obvious per-event Faust pipeline, the baseline of ``driftloop bench streams``.

Per event: parse, one table update per view, one Feast push (``write_to_online_store``) per view.
Run as ``python -m driftloop.bench.streams_baseline`` with the DRIFTLOOP_* settings in the environment.
"""

from __future__ import annotations

import time
from typing import Any

import faust
import pandas as pd

from driftloop.core.events import Invalid, parse
from driftloop.core.kafka import faust_broker_settings
from driftloop.core.logsetup import setup_logging
from driftloop.core.metrics import EVENTS_IN, serve_metrics
from driftloop.core.settings import get_settings
from driftloop.features import windows
from driftloop.features.repo import declarations, open_store


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, component="baseline")
    import aiokafka

    from driftloop.streams.faust_patches import ShortFetchConsumer

    aiokafka.AIOKafkaConsumer = ShortFetchConsumer  # type: ignore[misc]  # the same fetch wait as the real app
    topics = declarations(settings).topics
    store = open_store(settings)
    views = windows.specs_from_feast(store.list_stream_feature_views())
    app = faust.App(f"{settings.topic_prefix}baseline", web_enabled=False, store="memory://",
                    table_standby_replicas=0, **faust_broker_settings(settings))
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(*(settings.topic(t) for t in sorted(topics)), **raw)
    state = app.Table("baseline-state", default=dict, partitions=settings.partitions)
    prefix = len(settings.topic_prefix)

    @app.agent(source)
    async def process(stream: Any) -> None:
        async for ev in stream.events():
            topic = ev.message.topic[prefix:]
            try:
                row = parse(ev.message.value, topics[topic])
            except Invalid:
                continue
            ts = row["ts"]
            for view in (v for v in views if v.topic == topic):
                key = f"{view.name}|{row[view.entity_key]}"
                st = dict(state[key])
                windows.update(st, view, row, ts / 1e6)
                state[key] = st
                vals = windows.values(st, view, ts / 1e6)
                df = pd.DataFrame([{view.entity_key: row[view.entity_key], **vals,
                                    "event_timestamp": pd.Timestamp(ts, unit="us", tz="UTC"),
                                    "created": pd.Timestamp.now(tz="UTC")}])
                store.write_to_online_store(view.name, df)
            EVENTS_IN.labels(component="baseline", topic=topic).inc()

    @app.task
    async def _ready() -> None:
        serve_metrics(settings.metrics_port)
        (settings.run_dir / "baseline.ready").write_text(str(time.time()))

    faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
