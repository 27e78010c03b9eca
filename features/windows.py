"""Windowed aggregations of Feast stream feature views, in event time.

Semantics (the offline backfill must reproduce them exactly):

* Event time ``ts`` is bucketed by ``b = floor(ts / slide)``, where ``slide`` is the aggregation's
  ``slide_interval`` (Feast's default is the window itself, i.e. a tumbling window).
* The value of an aggregation with window ``W`` at event time ``t`` covers every *accepted* event of
  the entity whose bucket lies in ``(b(t) - ceil(W/slide), b(t)]`` and that was consumed before or with
  the event at ``t`` (the entity's source partition order). So an offline row at ``t`` includes events of
  ``t``'s bucket that arrived earlier, even if their time is later than ``t``; it never includes events
  consumed later.
* Offline: one row per accepted event and view, at the event's own time ``t`` (``event_timestamp = t``).
  Its ``created`` is the batch's time plus the row's index in the batch, so rows of one entity with equal
  event times order as consumed (Feast's created-timestamp tie-break picks the newest).
* Online: one row per entity and view, the value at the newest event time applied for the entity
  (``event_timestamp = max t``), recomputed after each micro-batch, so a late-arriving event inside the
  lateness updates the online value without moving its timestamp backwards.
* ``count`` counts non-null values of the column; ``sum``/``mean``/``min``/``max`` use numeric values;
  an empty window gives count 0 and null for the others.
* An event is *late* when its time is more than the source's ``watermark_delay_threshold`` behind the
  watermark (the highest event time seen before it on its topic-partition); late events are not applied.

Aggregations of one column with the same slide share one series of buckets
``{bucket: [n, sum, min, max]}``, so a view's state is ``{"t": max ts µs, "b": {series: buckets}}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

FUNCTIONS = ("count", "sum", "mean", "min", "max")
INT_KEYS = ("INT64", "INT32")  # Feast value types of an integer entity join key


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

    @cached_property
    def series(self) -> str:
        return f"{self.column}|{self.bucket_s:g}"


@dataclass(frozen=True)
class Series:
    key: str
    column: str
    bucket_s: float
    numeric: bool


@dataclass(frozen=True)
class ViewSpec:
    name: str
    topic: str
    entity_key: str
    aggs: tuple[AggSpec, ...]
    lateness_s: float
    udf: Callable[[Any], Any] | None = None
    mode: str = "python"
    key_type: str = "string"  # the entity join key's type: "string" or "int" (online rows carry it typed)

    def entity(self, text: str) -> str | int:
        """The typed entity value of its text form (the state key holds ``join_key=text``)."""
        return int(text) if self.key_type == "int" else text

    @cached_property
    def horizon_s(self) -> float:
        """How much event time of state must be kept."""
        return max(a.window_s + a.bucket_s for a in self.aggs) + self.lateness_s

    @cached_property
    def series(self) -> tuple[Series, ...]:
        out: dict[str, Series] = {}
        for a in self.aggs:
            numeric = a.function != "count" or (a.series in out and out[a.series].numeric)
            out[a.series] = Series(a.series, a.column, a.bucket_s, numeric)
        return tuple(out.values())

    @cached_property
    def plan(self) -> tuple[tuple[str, float, int, tuple[tuple[str, str], ...]], ...]:
        """Aggregations grouped by (series, window): ``(series, slide, n_buckets, ((name, function), ...))``."""
        groups: dict[tuple[str, float, int], list[tuple[str, str]]] = {}
        for a in self.aggs:
            groups.setdefault((a.series, a.bucket_s, a.n_buckets), []).append((a.name, a.function))
        return tuple((k[0], k[1], k[2], tuple(v)) for k, v in groups.items())


def specs_from_feast(views: list[Any]) -> list[ViewSpec]:
    """ViewSpecs from Feast StreamFeatureViews (aggregations, source topic, lateness, udf)."""
    out = []
    for v in views:
        aggs = []
        for a in v.aggregations:
            if a.function not in FUNCTIONS:
                raise ValueError(f"view {v.name}: aggregation function {a.function!r} not in {FUNCTIONS}")
            window = a.time_window.total_seconds()
            bucket = a.slide_interval.total_seconds() if a.slide_interval else window
            if window <= 0 or bucket <= 0:
                raise ValueError(f"view {v.name}: time_window and slide_interval must be positive")
            name = a.name or f"{a.function}_{a.column}_{int(window)}s"
            aggs.append(AggSpec(name, a.column, a.function, window, bucket))
        if not aggs:
            raise ValueError(f"view {v.name}: a stream feature view needs at least one Aggregation")
        if len(v.entity_columns) != 1:
            raise ValueError(f"view {v.name}: exactly one entity join key is supported")
        kopts = v.stream_source.kafka_options
        late = kopts.watermark_delay_threshold.total_seconds() if kopts.watermark_delay_threshold else 0.0
        mode = getattr(v.mode, "value", v.mode) or "python"
        key_type = "int" if v.entity_columns[0].dtype.to_value_type().name in INT_KEYS else "string"
        out.append(ViewSpec(v.name, kopts.topic, v.entity_columns[0].name, tuple(aggs), late,
                            udf=v.udf, mode=str(mode).lower(), key_type=key_type))
    return out


def update(state: dict[str, Any], view: ViewSpec, row: dict[str, Any], ts_s: float) -> None:
    """Fold one event into a view's state (see the module docstring for its layout)."""
    series = state.setdefault("b", {})
    for s in view.series:
        v = row.get(s.column)
        if v is None:
            continue
        x = float(v) if s.numeric else 0.0
        b = str(math.floor(ts_s / s.bucket_s))
        buckets = series.get(s.key)
        if buckets is None:
            buckets = series[s.key] = {}
        cell = buckets.get(b)
        if cell is None:
            buckets[b] = [1, x, x, x]
        else:
            cell[0] += 1
            cell[1] += x
            if x < cell[2]:
                cell[2] = x
            if x > cell[3]:
                cell[3] = x


_IN_WINDOW: dict[tuple[float, int, int], frozenset[str]] = {}  # (slide, n_buckets, hi) → bucket keys in the window


def _in_window(slide: float, n_buckets: int, hi: int) -> frozenset[str]:
    """The bucket keys of the window ending in bucket ``hi`` (cached: consecutive events share buckets)."""
    keys = _IN_WINDOW.get((slide, n_buckets, hi))
    if keys is None:
        if len(_IN_WINDOW) >= 4096:
            _IN_WINDOW.clear()
        keys = _IN_WINDOW[(slide, n_buckets, hi)] = frozenset(str(b) for b in range(hi - n_buckets + 1, hi + 1))
    return keys


def values(state: dict[str, Any], view: ViewSpec, ts_s: float) -> dict[str, float | int | None]:
    """Feature values at event time ``ts_s`` from a view's state (buckets summed in the state's order)."""
    out: dict[str, float | int | None] = {}
    series = state.get("b", {})
    for key, slide, n_buckets, aggs in view.plan:
        window = _in_window(slide, n_buckets, math.floor(ts_s / slide))
        n, total, mn, mx = 0, 0.0, math.inf, -math.inf
        for k, c in series.get(key, {}).items():
            if k in window:
                n += c[0]
                total += c[1]
                if c[2] < mn:
                    mn = c[2]
                if c[3] > mx:
                    mx = c[3]
        for name, fn in aggs:
            if fn == "count":
                out[name] = n
            elif n == 0:
                out[name] = None
            elif fn == "sum":
                out[name] = total
            elif fn == "mean":
                out[name] = total / n
            elif fn == "min":
                out[name] = mn
            else:
                out[name] = mx
    return out


def prune(state: dict[str, Any], view: ViewSpec, watermark_s: float) -> None:
    """Drop buckets no window can reach any more (older than the horizon behind the watermark)."""
    series = state.get("b", {})
    for s in view.series:
        buckets = series.get(s.key)
        if buckets:
            oldest = math.floor((watermark_s - view.horizon_s) / s.bucket_s)
            for k in [k for k in buckets if int(k) < oldest]:
                del buckets[k]
