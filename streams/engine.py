"""The feature engine: one micro-batch of source records in, state updates and sink rows out.

No I/O here: the Faust app (``app.py``) feeds batches and writes what comes back, in this order:
offline rows (Delta, idempotent by source offsets) → online rows → state records (changelog) → flush
→ offsets committed. That order makes aggregates exact after a kill -9 without transactions:

* every entity record carries ``_o``, the last source offset applied per topic-partition; a replayed
  record at or below it is skipped (its rows were durable before the state was written);
* the per-topic-partition watermark is kept in the same table (``_wm|topic|partition``), written after
  the entity records of the batch, so a restart evaluates lateness as the first run did.

State per entity (table key ``join_key=value``): ``{"_o": {"topic:p": offset}, "v": {view: view_state},
"l": {impression_id: [ts, clicked, click_ts]}}`` (``l``: the label joiner's pending impressions).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from driftloop.features import windows
from driftloop.features.windows import ViewSpec
from driftloop.core.contracts import Event, Label
from driftloop.streams.validation import Invalid, parse

log = logging.getLogger(__name__)

StateGet = Callable[[str], dict[str, Any] | None]


@dataclass
class Record:
    """One consumed Kafka record; ``topic`` is the logical name (prefix removed)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchOutput:
    offline: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # table → columns
    online: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # view → one row per entity
    dlq: list[tuple[Record, str, str]] = field(default_factory=list)  # record, reason, detail
    states: dict[str, tuple[dict[str, Any], Record]] = field(default_factory=dict)  # key → (state, routing)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (logical topic, p) → last offset
    labels: list[Label] = field(default_factory=list)
    touched: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # key → views updated
    accepted: int = 0
    skipped: int = 0

    def add_row(self, table: str, row: dict[str, Any]) -> None:
        cols = self.offline.get(table)
        if cols is None:
            cols = self.offline[table] = {k: [] for k in row}
        for k, v in row.items():
            cols[k].append(v)


@dataclass
class LabelRule:
    """Which topics are impressions and clicks, and the label window (the ad domain's label)."""

    impressions: str = "events.impressions"
    clicks: str = "events.clicks"
    window_s: float = 5.0


class FeatureEngine:
    def __init__(self, views: list[ViewSpec], contracts: dict[str, type[Event]], label_rule: LabelRule | None):
        self.views = views
        self.contracts = contracts
        self.by_topic: dict[str, list[ViewSpec]] = defaultdict(list)
        for v in views:
            if v.topic not in contracts:
                raise ValueError(f"view {v.name}: topic {v.topic!r} is not a known event topic {sorted(contracts)}")
            self.by_topic[v.topic].append(v)
        for topic, vs in self.by_topic.items():
            if len({v.entity_key for v in vs}) > 1:
                raise ValueError(f"views on {topic} must share one entity join key (the message key)")
        self.lateness_us = {t: int(max(v.lateness_s for v in vs) * 1e6) for t, vs in self.by_topic.items()}
        self.label = label_rule
        self.watermarks: dict[tuple[str, int], int] = {}
        self.due: dict[int, list[tuple[int, str, str]]] = defaultdict(list)  # p → heap (due ts, entity, iid)

    def entity_key(self, topic: str, row: dict[str, Any]) -> str:
        vs = self.by_topic.get(topic)
        jk = vs[0].entity_key if vs else "user_id"
        return f"{jk}={row[jk]}"

    def reset(self, items: Any = ()) -> None:
        """Forget in-memory watermarks and label timers (after a rebalance) and re-index ``items``."""
        self.watermarks.clear()
        self.due.clear()
        if self.label is None:
            return
        window_us = int(self.label.window_s * 1e6)
        for key, st in items:
            if key.startswith("_") or not st:
                continue
            for iid, (ts, _c, _cts, p) in st.get("l", {}).items():
                if ts is not None:
                    heapq.heappush(self.due[p], (ts + window_us, key, iid))

    def process(self, records: list[Record], get: StateGet, now_us: int | None = None) -> BatchOutput:
        out = BatchOutput()
        now_us = now_us or time.time_ns() // 1000
        cache: dict[str, dict[str, Any]] = {}
        accepted: list[tuple[Record, Event, dict[str, Any], str]] = []
        wm_touched: dict[tuple[str, int], Record] = {}
        for r in records:
            tp = (r.topic, r.partition)
            out.offsets[tp] = max(out.offsets.get(tp, -1), r.offset)
            try:
                ev = parse(r.value, self.contracts[r.topic])
            except Invalid as e:
                out.dlq.append((r, e.reason, e.detail))
                continue
            row = ev.__dict__
            key = self.entity_key(r.topic, row)
            st = cache.get(key)
            if st is None:
                st = cache[key] = get(key) or {"_o": {}, "v": {}, "l": {}}
            okey = f"{r.topic}:{r.partition}"
            if r.offset <= st["_o"].get(okey, -1):
                out.skipped += 1
                continue
            wm = self._watermark(tp, get)
            if wm is not None and ev.ts < wm - self.lateness_us.get(r.topic, 0):
                out.dlq.append((r, "late", f"ts {ev.ts} is more than {self.lateness_us.get(r.topic, 0) / 1e6:g}s "
                                            f"behind the watermark {wm}"))
                continue
            if wm is None or ev.ts > wm:
                self.watermarks[tp] = ev.ts
            wm_touched[tp] = r
            st["_o"][okey] = r.offset
            out.states[key] = (st, r)
            accepted.append((r, ev, row, key))
        out.accepted = len(accepted)
        self._aggregate(accepted, cache, out, now_us)
        self._bronze(accepted, out, now_us)
        if self.label is not None:
            self._labels(accepted, cache, out, get, now_us)
        self._finish(cache, out, now_us)
        for (topic, p), r in wm_touched.items():
            out.states[f"_wm|{topic}|{p}"] = ({"wm": self.watermarks[(topic, p)], "o": r.offset}, r)
        return out

    def _watermark(self, tp: tuple[str, int], get: StateGet) -> int | None:
        if tp not in self.watermarks:
            saved = get(f"_wm|{tp[0]}|{tp[1]}")
            if saved is None:
                return None
            self.watermarks[tp] = saved["wm"]
        return self.watermarks[tp]

    def _view_inputs(self, view: ViewSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        """The rows the view aggregates: the events, or the udf's output aligned with them (None = dropped)."""
        if view.udf is None:
            return rows
        if view.mode == "pandas":
            df = pd.DataFrame(rows)
            df["event_timestamp"] = pd.to_datetime(df["ts"], unit="us", utc=True)
            res = view.udf(df)
            if not isinstance(res, pd.DataFrame) or not res.index.isin(df.index).all():
                raise ValueError(f"view {view.name}: a pandas udf must return a DataFrame indexed like its input")
            aligned: list[dict[str, Any] | None] = [None] * len(rows)
            for i, rec in zip(res.index, res.to_dict("records"), strict=True):
                aligned[i] = rec
            return aligned
        cols = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
        res = view.udf(cols)
        n = len(rows)
        if not isinstance(res, dict) or any(len(v) != n for v in res.values()):
            raise ValueError(f"view {view.name}: a python udf must return a dict of lists as long as its input")
        return [{k: v[i] for k, v in res.items()} for i in range(n)]

    def _aggregate(self, accepted: list[tuple[Record, Event, dict[str, Any], str]],
                   cache: dict[str, dict[str, Any]], out: BatchOutput, now_us: int) -> None:
        for topic, views in self.by_topic.items():
            mine = [a for a in accepted if a[0].topic == topic]
            if not mine:
                continue
            for view in views:
                inputs = self._view_inputs(view, [a[2] for a in mine])
                for (r, ev, row, key), vrow in zip(mine, inputs, strict=True):
                    if vrow is None:
                        continue
                    vst = cache[key]["v"].get(view.name)
                    if vst is None:
                        vst = cache[key]["v"][view.name] = {"t": ev.ts, "b": {}}
                    ts_s = ev.ts / 1e6
                    windows.update(vst, view, vrow, ts_s)
                    if ev.ts > vst["t"]:
                        vst["t"] = ev.ts
                    out.touched[key].add(view.name)
                    out.add_row(view.name, {view.entity_key: row[view.entity_key],
                                            **windows.values(vst, view, ts_s), "event_timestamp": ev.ts,
                                            "created": now_us + len(out.offline.get(view.name, {}).get("_offset", ())),
                                            "_topic": r.topic, "_partition": r.partition,
                                            "_offset": r.offset})

    @staticmethod
    def _bronze(accepted: list[tuple[Record, Event, dict[str, Any], str]], out: BatchOutput, now_us: int) -> None:
        for r, ev, row, _key in accepted:
            out.add_row(f"bronze_{r.topic.split('.')[-1]}",
                        {**row, "event_timestamp": ev.ts, "ingested_at": now_us, "_topic": r.topic,
                         "_partition": r.partition, "_offset": r.offset})

    def _labels(self, accepted: list[tuple[Record, Event, dict[str, Any], str]],
                cache: dict[str, dict[str, Any]], out: BatchOutput, get: StateGet, now_us: int) -> None:
        rule = self.label
        assert rule is not None
        window_us = int(rule.window_s * 1e6)
        for r, ev, row, key in accepted:
            pending = cache[key]["l"]
            if r.topic == rule.impressions:
                ts, c, cts, _p = pending.get(ev.event_id) or (None, 0, None, r.partition)
                clicked = 1 if c and (cts is None or cts - ev.ts <= window_us) else 0
                pending[ev.event_id] = [ev.ts, clicked, cts, r.partition]
                heapq.heappush(self.due[r.partition], (ev.ts + window_us, key, ev.event_id))
            elif r.topic == rule.clicks:
                iid = row["impression_id"]
                cur = pending.get(iid)
                if cur is None:  # the click was consumed before its impression (the other topic lagged)
                    pending[iid] = [None, 1, ev.ts, r.partition]
                elif cur[0] is None or ev.ts - cur[0] <= window_us:
                    cur[1] = 1
        last = {r.partition: r for r, *_ in accepted}
        for p, routing in last.items():
            heap = self.due[p]
            # a label is final once the clicks' event time passed its window (impressions' if no click yet)
            wm = self.watermarks.get((rule.clicks, p), self.watermarks.get((rule.impressions, p)))
            if wm is None:
                continue
            while heap and heap[0][0] <= wm:
                _, key, iid = heapq.heappop(heap)
                st = cache.get(key)
                if st is None:
                    st = cache[key] = get(key) or {"_o": {}, "v": {}, "l": {}}
                cur = st["l"].pop(iid, None)
                if cur is None or cur[0] is None:
                    continue
                user = key.split("=", 1)[1]
                out.labels.append(Label.model_construct(schema_version=1, event_id=iid, impression_id=iid,
                                                        user_id=user, label=cur[1], ts=cur[0]))
                if key not in out.states:
                    out.states[key] = (st, routing)
        for lb in out.labels:
            out.add_row("labels", {**lb.model_dump(), "event_timestamp": lb.ts, "created": now_us,
                                   "_topic": "labels", "_partition": 0, "_offset": 0})

    def _finish(self, cache: dict[str, dict[str, Any]], out: BatchOutput, now_us: int) -> None:
        """Online rows at each updated entity's newest time; prune state behind the watermark."""
        by_name = {v.name: v for v in self.views}
        for key, names in out.touched.items():
            st, r = out.states[key]
            entity = key.split("=", 1)[1]
            for name in names:
                view = by_name[name]
                vst = st["v"][name]
                out.online.setdefault(name, []).append(
                    {view.entity_key: entity, **windows.values(vst, view, vst["t"] / 1e6),
                     "event_timestamp": vst["t"], "created": now_us})
                wm = self.watermarks.get((view.topic, r.partition))
                if wm is not None:  # after the online value: an idle entity keeps its value at its last time
                    windows.prune(vst, view, wm / 1e6)
        if self.label is None:
            return
        for key, (st, r) in out.states.items():
            wm = self.watermarks.get((r.topic, r.partition))
            if key.startswith("_") or wm is None:
                continue
            horizon = wm - int(60 * self.label.window_s * 1e6)
            for iid in [i for i, v in st["l"].items() if v[0] is None and v[2] < horizon]:
                del st["l"][iid]  # a click whose impression never came
