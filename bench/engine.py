"""``driftloop bench engine``: the streams feature engine alone (``streams/engine.py``), in process, no broker
and no stores: the backlog ``driftloop bench streams`` drains (the example's 3 stream feature views and its
label join), cut into the worker's micro-batches, each batch's state records kept for the next as the worker
keeps them. Events/s and µs per event, median of ``repeats`` fresh engines.

The streams worker's rate is bounded by this one core of Python per record; with no broker or store in the
way the figure moves far less than the end-to-end bench's, so an engine change is measured here (against runs
taken right before it: the machine's speed still moves it) and confirmed there.
"""

from __future__ import annotations

import gc
import time
import uuid
from collections import defaultdict
from typing import Any

import orjson

from driftloop.bench.common import report, spread
from driftloop.bench.streams import backlog_events
from driftloop.core.declarations import Declarations
from driftloop.core.settings import Settings
from driftloop.features import windows
from driftloop.features.repo import apply
from driftloop.streams.app import Router
from driftloop.streams.engine import FeatureEngine, Record


def records(events: list[tuple[str, dict]], decls: Declarations, router: Router) -> list[Record]:
    """The events as the worker's engine sees them: keyed by their topic's key, on the partition the worker's
    router gives that key, with offsets per topic-partition in send order."""
    offsets: dict[tuple[str, int], int] = defaultdict(lambda: -1)
    out = []
    for topic, rec in events:
        key = str(rec[decls.topics[topic].key]).encode()
        p = router.partition(key)
        offsets[(topic, p)] += 1
        out.append(Record(topic, p, offsets[(topic, p)], key, orjson.dumps(rec)))
    return out


def engine_rate(engine: FeatureEngine, recs: list[Record], batch: int) -> float:
    """Events/s of ``engine`` over ``recs`` in batches of ``batch``, states carried from batch to batch."""
    state: dict[str, Any] = {}
    now = time.time_ns() // 1000
    t0 = time.perf_counter()
    for i in range(0, len(recs), batch):
        out = engine.process(recs[i:i + batch], state.get, now_us=now)
        for key, (value, _r) in out.states.items():
            state[key] = value
        gc.freeze()  # as the worker's Collector does after each batch
    took = time.perf_counter() - t0
    gc.unfreeze()
    return len(recs) / took


def run(base: Settings, events: int = 100_000, batch: int = 20_000, repeats: int = 3) -> dict[str, Any]:
    s = Settings(**{**base.model_dump(), "data_dir": base.root / "bench" / f"engine-{uuid.uuid4().hex[:6]}"})
    store, _plan, decls = apply(s)
    views = windows.specs_from_feast(store.list_stream_feature_views())
    recs = records(backlog_events(events, seed=1), decls, Router(s, decls))
    print(f"{len(recs):,} events ({len(views)} views, models {', '.join(decls.models)}), batches of {batch:,}",
          flush=True)
    rates = []
    for i in range(repeats):
        rate = engine_rate(FeatureEngine(views, decls, max_future_s=s.max_future_s), recs, batch)
        rates.append(rate)
        print(f"[{i + 1}/{repeats}] {rate:,.0f} events/s ({1e6 / rate:.1f} µs an event)", flush=True)
    med = spread(rates)
    print(f"engine {med['median']:,.0f} events/s (min {med['min']:,.0f}, max {med['max']:,.0f}) = "
          f"{1e6 / med['median']:.1f} µs an event", flush=True)
    result = {"events": len(recs), "batch": batch, "repeats": repeats, "events_per_s": round(med["median"]),
              "events_per_s_min": round(med["min"]), "events_per_s_max": round(med["max"]),
              "us_per_event": round(1e6 / med["median"], 2)}
    report(result)
    return result
