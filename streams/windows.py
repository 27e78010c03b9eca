"""Windowed aggregations of Feast stream feature views, in event time.

Semantics (the offline backfill must reproduce them exactly):

* Event time ``ts`` is bucketed by ``b = floor(ts / bucket)``, where ``bucket`` is the
  aggregation's ``slide_interval`` (default 1 s).
* The value of an aggregation with window ``W`` at event time ``t`` covers every event of the entity
  whose bucket lies in ``(b(t) - W/bucket, b(t)]``, i.e. the last ``W`` of event time ending with the
  bucket that holds ``t`` (events later within the same bucket are included once they arrive).
* The online row carries ``event_timestamp = t`` of the newest event applied for that entity.
* ``count`` counts non-null values of the column; ``sum``/``mean``/``min``/``max`` use numeric values;
  an empty window gives count 0 and null for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FUNCTIONS = ("count", "sum", "mean", "min", "max")


@dataclass(frozen=True)
class AggSpec:
    name: str
    column: str
    function: str
    window_s: float
    bucket_s: float

    @property
    def n_buckets(self) -> int:
        return max(1, math.ceil(self.window_s / self.bucket_s))


@dataclass(frozen=True)
class ViewSpec:
    name: str
    topic: str
    entity_key: str
    aggs: tuple[AggSpec, ...]
    lateness_s: float

    @property
    def horizon_s(self) -> float:
        """How much event time of state must be kept."""
        return max(a.window_s + a.bucket_s for a in self.aggs) + self.lateness_s


def specs_from_feast(views: list[Any]) -> list[ViewSpec]:
    """ViewSpecs from Feast StreamFeatureViews (reads aggregations, source topic and lateness)."""
    out = []
    for v in views:
        aggs = []
        for a in v.aggregations:
            if a.function not in FUNCTIONS:
                raise ValueError(f"view {v.name}: aggregation function {a.function!r} not in {FUNCTIONS}")
            bucket = a.slide_interval.total_seconds() if a.slide_interval else 1.0
            window = a.time_window.total_seconds()
            name = a.name or f"{a.function}_{a.column}_{int(window)}s"
            aggs.append(AggSpec(name, a.column, a.function, window, bucket))
        if len(v.entity_columns) != 1:
            raise ValueError(f"view {v.name}: exactly one entity join key is supported")
        kopts = v.stream_source.kafka_options
        late = kopts.watermark_delay_threshold.total_seconds() if kopts.watermark_delay_threshold else 0.0
        out.append(ViewSpec(v.name, kopts.topic, v.entity_columns[0].name, tuple(aggs), late))
    return out


def update(state: dict[str, Any], view: ViewSpec, row: dict[str, Any], ts_s: float) -> None:
    """Fold one event into an entity's state: ``{agg_name: {bucket: [n, sum, min, max]}}``."""
    for a in view.aggs:
        v = row.get(a.column)
        if v is None:
            continue
        b = str(math.floor(ts_s / a.bucket_s))
        buckets = state.setdefault(a.name, {})
        cell = buckets.get(b)
        x = float(v) if a.function != "count" else 0.0
        if cell is None:
            buckets[b] = [1, x, x, x]
        else:
            cell[0] += 1
            cell[1] += x
            cell[2] = min(cell[2], x)
            cell[3] = max(cell[3], x)


def values(state: dict[str, Any], view: ViewSpec, ts_s: float) -> dict[str, float | int | None]:
    """Feature values at event time ``ts_s`` from an entity's state."""
    out: dict[str, float | int | None] = {}
    for a in view.aggs:
        hi = math.floor(ts_s / a.bucket_s)
        lo = hi - a.n_buckets
        cells = [c for k, c in state.get(a.name, {}).items() if lo < int(k) <= hi]
        n = sum(c[0] for c in cells)
        if a.function == "count":
            out[a.name] = n
        elif n == 0:
            out[a.name] = None
        elif a.function == "sum":
            out[a.name] = sum(c[1] for c in cells)
        elif a.function == "mean":
            out[a.name] = sum(c[1] for c in cells) / n
        elif a.function == "min":
            out[a.name] = min(c[2] for c in cells)
        else:
            out[a.name] = max(c[3] for c in cells)
    return out


def prune(state: dict[str, Any], view: ViewSpec, watermark_s: float) -> None:
    """Drop buckets no window can reach any more (older than the horizon behind the watermark)."""
    for a in view.aggs:
        oldest = math.floor((watermark_s - view.horizon_s) / a.bucket_s)
        buckets = state.get(a.name)
        if buckets:
            for k in [k for k in buckets if int(k) < oldest]:
                del buckets[k]
