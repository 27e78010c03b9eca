"""The feature engine: one micro-batch of source records in, state updates and sink rows out.

No I/O here: the Faust app (``app.py``) feeds batches of every declared topic and writes what comes
back, in this order: online rows (monotonic, at once) → offline rows (Delta, idempotent by source offsets)
→ state records (changelog) → flush → offsets committed (the last four for several batches at once). That
order makes aggregates and labels exact after a kill -9 without transactions:

* every entity record carries ``_o``, the last source offset applied per topic-partition; a replayed
  record at or below it is skipped (its rows were durable before the state was written), but still
  moves the watermark as it did the first time;
* the per-topic-partition watermark is kept in the same table (``_wm|topic|partition``: ``wm``, the highest
  event time accepted, and ``e``, the batch's last offset), written after the entity records of every
  batch, so a restart evaluates lateness as the first run did. A replayed record at or below ``e`` comes
  from a batch whose state is all durable: its watermark move is in ``wm`` already, and if its entity's
  ``_o`` does not cover it, it was refused then and is refused again (``late``, else ``future``).

Event time is bounded by the wall clock (``max_future_s``; None: unbounded, for simulated clocks): a fresh
record stamped more than that ahead of ``now_us`` is dead-lettered ``future`` and never moves the
watermark, so one producer's fast clock cannot make everyone else's events late; every watermark read is
clamped to ``now_us + max_future_s`` (a no-op for watermarks built under the bound; it caps one saved
before). This is the only decision that depends on the clock, so a replay must not re-take it with a later
clock: a record at or below ``e`` is decided by ``e`` (above), and a skipped record above it moves the
watermark only if it is within the bound now (one beyond it now was beyond it then: refused). Left to the
later clock: a record refused ``future`` in the batch in flight at a kill -9 (between its Delta writes and
its flush) whose time is within the bound by the replay is applied then. Nothing is lost (it is in ``dlq``
and in the features), but its offline rows are dropped as already written, and the records after it in that
batch are judged against its watermark. Closing that window needs the batch's clock written before its
Delta rows.

State per entity (table key ``join_key=value``, the value as text)::

    {"_o": {"topic:p": offset}, "v": {view: view_state},
     "l": {model: {scored event id: [scored ts, outcome ts, value, partition, orphans]}},
     "f": {model: {scored event id: scored ts}}}

``l`` holds the label joins in progress (``outcome ts``/``value``: the earliest outcome seen;
``orphans``: ``[[offset, outcome record], ...]`` while the scored event has not arrived, at most
``UNMATCHED_HORIZON`` windows), ``f`` the ids whose label is final, so a late outcome is recognised. A final
id is kept at least until the join watermark is two windows plus the outcome topic's lateness past its event: an
outcome that comes later is behind the watermark by more than the lateness (dead-lettered ``late``) or more
than a window after the event it names (it could not have counted), and waits as unmatched. (Keeping them
for many windows would make a busy entity's state record, rewritten each batch, grow with the traffic.) The
clock is the lower of the join watermark and the scored topic's, so a copy of a scored event (a producer that
re-sent it) finds its label final even while the outcome topic is read far ahead (a backlog).

Label rules (``ModelSpec.label``):

* ``outcome``: the outcome topic's ``id_field`` names the scored event. Binary: 1 if an outcome's time is
  at most ``window_s`` after the scored event's, else 0. Regression / multiclass: the value of the
  earliest outcome, if that is within the window; else no label. A label is final once the outcome
  topic's watermark (same partition; the scored topic's while the outcome topic has none) passes the
  scored time + window. An outcome for a final label is dead-lettered (``late_outcome``); one whose scored
  event never came is dead-lettered when pruned (``unmatched_outcome``).
* ``field``: each labels-topic record is a label of the event its ``id_field`` names.

A label row in Delta carries the origin of the record that made it final (the outcome that moved the
watermark, the scored event itself, the batch's last record for a close by the scored topic's watermark, or
the field record). A replay can close the same join on another record (other batch cuts, another interleaving
of the two topics), so the labels sink is idempotent by (model, event id), not by that origin
(``sinks.LabelSink``): after a restart it reads back the rows this engine could emit again
(``label_floors``).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import pandas as pd
from pydantic import ValidationError

from driftloop.core.contracts import Label
from driftloop.core.declarations import Declarations, ModelSpec, TopicSpec, bronze_table
from driftloop.core.events import Invalid, columns, parse
from driftloop.features import windows
from driftloop.features.windows import ViewSpec

log = logging.getLogger(__name__)

StateGet = Callable[[str], dict[str, Any] | None]
CaughtUp = Callable[[str, int], bool]
WATERMARK_PREFIX = "_wm|"  # state keys of the per-topic-partition watermark records
UNMATCHED_HORIZON = 60  # windows of event time an outcome waits for its scored event
LABELS_TABLE = "labels"


@dataclass
class Record:
    """One consumed Kafka record; ``topic`` is the logical name (prefix removed)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class LabelRow(NamedTuple):
    """A label the engine made: the fields of ``contracts.Label`` without pydantic's cost per row (one label per
    scored event); its record is ``Label``'s."""

    model_name: str
    key: str
    label: float
    event_id: str
    ts: int

    def to_bytes(self) -> bytes:
        return orjson.dumps({"schema_version": Label.SCHEMA_VERSION, "event_id": self.event_id, "ts": self.ts,
                             "model_name": self.model_name, "key": self.key, "label": self.label})


@dataclass
class BatchOutput:
    offline: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # table → columns
    online: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # view → one row per entity
    dlq: list[tuple[Record, str, str]] = field(default_factory=list)  # record, reason, detail
    states: dict[str, tuple[dict[str, Any], Record]] = field(default_factory=dict)  # key → (state, routing)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (logical topic, p) → last offset
    labels: list[tuple[LabelRow, Record]] = field(default_factory=list)  # label, the record that made it final
    touched: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # key → views updated
    late_outcomes: Counter[str] = field(default_factory=Counter)  # model → outcomes after the label was final
    unlabelled: Counter[str] = field(default_factory=Counter)  # model → scored events without an outcome
    accepted: int = 0
    skipped: int = 0

    def merge(self, later: BatchOutput) -> None:
        """Take in a later batch's output (its states and last offsets replace these; rows and counts add up)."""
        for table, cols in later.offline.items():
            self.add_columns(table, cols)
        self.dlq += later.dlq
        self.labels += later.labels
        self.states.update(later.states)
        for key in [k for k in self.states if k.startswith(WATERMARK_PREFIX)]:  # last, as in one batch: each
            self.states[key] = self.states.pop(key)  # vouches for every entity record written before it
        for tp, o in later.offsets.items():
            self.offsets[tp] = max(o, self.offsets.get(tp, -1))
        self.late_outcomes.update(later.late_outcomes)
        self.unlabelled.update(later.unlabelled)
        self.accepted += later.accepted
        self.skipped += later.skipped

    def add_row(self, table: str, row: dict[str, Any]) -> None:
        cols = self.offline.get(table)
        if cols is None:
            cols = self.offline[table] = {k: [] for k in row}
        for k, v in row.items():
            cols[k].append(v)

    def add_columns(self, table: str, columns: dict[str, list[Any]]) -> None:
        """Append rows given as equally long columns (the same names, in the same order, as earlier rows)."""
        cols = self.offline.get(table)
        if cols is None:
            self.offline[table] = columns
            return
        for k, v in columns.items():
            cols[k].extend(v)


Accepted = tuple[Record, dict[str, Any], str]  # record, validated row, entity key


def _origins(accepted: list[Accepted]) -> dict[str, list[Any]]:
    """The ``_topic``, ``_partition`` and ``_offset`` columns of rows made from ``accepted`` records."""
    return {"_topic": [r.topic for r, _row, _k in accepted], "_partition": [r.partition for r, _row, _k in accepted],
            "_offset": [r.offset for r, _row, _k in accepted]}


class FeatureEngine:
    """Validation, de-duplication, the stream feature views and the label joins of every declared topic."""

    def __init__(self, views: list[ViewSpec], decls: Declarations, max_future_s: float | None = None):
        self.views = views
        self.max_future_us = None if max_future_s is None else int(max_future_s * 1e6)
        self.topics: dict[str, TopicSpec] = dict(decls.topics)
        self.by_topic: dict[str, list[ViewSpec]] = defaultdict(list)
        for v in views:
            spec = self.topics.get(v.topic)
            if spec is None:
                raise ValueError(f"view {v.name}: topic {v.topic!r} is not a declared topic {sorted(self.topics)}")
            if v.entity_key != spec.key:
                raise ValueError(f"view {v.name}: entity key {v.entity_key!r} is not {v.topic}'s key {spec.key!r}")
            self.by_topic[v.topic].append(v)
        self.lateness_us = {t: int(max([s.lateness_s, *(v.lateness_s for v in self.by_topic.get(t, ()))]) * 1e6)
                            for t, s in self.topics.items()}
        self.models = dict(decls.models)
        self.scored_by: dict[str, list[ModelSpec]] = defaultdict(list)  # topic → outcome-joined models it scores
        self.outcome_of: dict[str, list[ModelSpec]] = defaultdict(list)  # topic → models it is the outcome of
        self.field_of: dict[str, list[ModelSpec]] = defaultdict(list)  # topic → models it labels directly
        self.finalise_on: dict[str, list[ModelSpec]] = defaultdict(list)  # topic → joins its watermark may close
        for m in self.models.values():
            for t in (m.topic, m.label.topic):
                if t not in self.topics:
                    raise ValueError(f"model {m.name}: topic {t!r} is not a declared topic {sorted(self.topics)}")
            if m.label.kind == "field":
                self.field_of[m.label.topic].append(m)
                continue
            self.scored_by[m.topic].append(m)
            self.outcome_of[m.label.topic].append(m)
            self.finalise_on[m.topic].append(m)
            self.finalise_on[m.label.topic].append(m)
        self.label_topics = set(self.finalise_on) | set(self.field_of)
        self.watermarks: dict[tuple[str, int], int] = {}  # highest event time accepted per topic-partition
        self.ends: dict[tuple[str, int], int] = {}  # last offset of the last batch whose state is written
        self.loaded: set[tuple[str, int]] = set()  # topic-partitions whose saved watermark record was read
        self.limit: int | None = None  # the batch's clock + max_future_s: no event time (or watermark) beyond
        self.due: dict[tuple[str, int], list[tuple[int, str, str]]] = defaultdict(list)  # (model, p) → heap
        self.waiting: set[str] = set()  # entities with outcomes whose scored event has not arrived (pruned)
        self.newest: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}  # (entity, view) → the batch's
        # last event time and values (the online row's values when that event is the entity's newest)
        self.open_since: dict[str, int] = {}  # model → the earliest scored time of a join open in the reset state

    def entity_key(self, topic: str, row: dict[str, Any]) -> str:
        k = self.topics[topic].key
        return f"{k}={row[k]}"

    @staticmethod
    def window_us(m: ModelSpec) -> int:
        return int(m.label.window_s * 1e6)

    def reset(self, items: Any = ()) -> None:
        """Forget in-memory watermarks and label timers (after a rebalance) and re-index ``items``."""
        self.watermarks.clear()
        self.ends.clear()
        self.loaded.clear()
        self.due.clear()
        self.waiting.clear()
        self.open_since.clear()
        for key, st in items:
            if key.startswith("_") or not st:
                continue
            for name, joins in st.get("l", {}).items():
                m = self.models.get(name)
                if m is None or m.label.kind != "outcome":
                    continue
                w = self.window_us(m)
                for eid, e in joins.items():
                    if e[0] is not None:
                        self.due[(name, e[3])].append((e[0] + w, key, eid))
                        self.open_since[name] = min(e[0], self.open_since.get(name, e[0]))
                    else:
                        self.waiting.add(key)
        for heap in self.due.values():
            heapq.heapify(heap)

    def label_floors(self, partitions: Iterable[int], get: StateGet, now_us: int | None = None
                     ) -> dict[tuple[str, int], int | None]:
        """The earliest event time of a label this engine can still emit, per (model, partition) of
        ``partitions`` (None: any), from the state given to ``reset``. A label is emitted again only if its
        join is open in that state (``open_since``) or its record is applied again: the scored event (a field
        label's record), whose time is at most its topic's lateness behind the saved watermark of its
        topic-partition (none saved: any time)."""
        now_us = now_us or time.time_ns() // 1000
        floors: dict[tuple[str, int], int | None] = {}
        for name, m in self.models.items():
            topic = m.label.topic if m.label.kind == "field" else m.topic
            for p in partitions:
                wm = (get(f"{WATERMARK_PREFIX}{topic}|{p}") or {}).get("wm")
                if wm is None:
                    floors[(name, p)] = None
                    continue
                if self.max_future_us is not None:  # the watermark read is clamped to the clock's bound
                    wm = min(wm, now_us + self.max_future_us)
                floors[(name, p)] = min(wm - self.lateness_us[topic], self.open_since.get(name, wm))
        return floors

    def process(self, records: list[Record], get: StateGet, now_us: int | None = None,
                caught_up: CaughtUp | None = None) -> BatchOutput:
        """One micro-batch. ``caught_up(topic, partition)``: whether every record of that topic-partition the
        broker holds has been consumed (None: always); a join closes by its scored topic's watermark only on
        partitions whose outcome topic has no watermark yet and is caught up."""
        out = BatchOutput()
        now_us = now_us or time.time_ns() // 1000
        self.limit = None if self.max_future_us is None else now_us + self.max_future_us
        self.newest.clear()
        cache: dict[str, dict[str, Any]] = {}
        accepted: list[Accepted] = []
        last: dict[tuple[str, int], Record] = {}  # the last record of each topic-partition
        last_ok: dict[tuple[str, int], Record] = {}  # the last record of each topic-partition not dead-lettered
        for r in records:
            tp = (r.topic, r.partition)
            out.offsets[tp] = max(out.offsets.get(tp, -1), r.offset)
            last[tp] = r
            try:
                row = parse(r.value, self.topics[r.topic])
            except Invalid as e:
                out.dlq.append((r, e.reason, e.detail))
                continue
            ts = row["ts"]
            key = self.entity_key(r.topic, row)
            if r.key is not None and r.key.decode(errors="replace") != key[key.index("=") + 1:]:
                out.dlq.append((r, "key", f"record key {r.key[:100]!r} is not its {key[:key.index('=')]} "
                                          f"{key[key.index('=') + 1:][:100]!r} (key records by the declared key)"))
                continue
            st = self._state(key, cache, get)
            okey = f"{r.topic}:{r.partition}"
            wm = self._watermark(tp, get)
            replayed = r.offset <= self.ends.get(tp, -1)  # its batch's state and watermark are written
            if r.offset <= st["_o"].get(okey, -1):  # applied before a crash: it moved the watermark then too
                out.skipped += 1
                fresh = False
            else:
                refused = self._refusal(r.topic, ts, wm, now_us, replayed)
                if refused is not None:
                    out.dlq.append((r, *refused))
                    continue
                fresh = True
                st["_o"][okey] = r.offset
                out.states[key] = (st, r)
                accepted.append((r, row, key))
            if not replayed and (self.limit is None or ts <= self.limit) and ts > self.watermarks.get(tp, ts - 1):
                self.watermarks[tp] = ts
            last_ok[tp] = r
            if r.topic in self.label_topics:
                self._join(r, row, key, st, out, fresh, cache, get)
        out.accepted = len(accepted)
        self._aggregate(accepted, cache, out, now_us)
        self._bronze(accepted, out, now_us)
        self._fallback_finalise(last_ok, cache, get, out, caught_up)
        self._finish(cache, out, get, now_us)
        if out.labels:
            labels, origins = [lb for lb, _r in out.labels], [r for _lb, r in out.labels]
            out.add_columns(LABELS_TABLE, {
                "model_name": [lb.model_name for lb in labels], "event_id": [lb.event_id for lb in labels],
                "key": [lb.key for lb in labels], "label": [lb.label for lb in labels],
                "ts": [lb.ts for lb in labels], "event_timestamp": [lb.ts for lb in labels],
                "created": [now_us] * len(labels), "_topic": [r.topic for r in origins],
                "_partition": [r.partition for r in origins], "_offset": [r.offset for r in origins]})
        for tp, r in last.items():  # after the entity records: once written, it vouches for them
            wm = self._watermark(tp, get)  # (read first: a partition of invalid records only was never read)
            self.ends[tp] = out.offsets[tp]
            out.states[f"{WATERMARK_PREFIX}{tp[0]}|{tp[1]}"] = ({"wm": wm, "e": out.offsets[tp]}, r)
        return out

    def _refusal(self, topic: str, ts: int, wm: int | None, now_us: int, replayed: bool) -> tuple[str, str] | None:
        """Why a fresh record is dead-lettered (reason, detail), or None if it is applied."""
        late = self.lateness_us[topic]
        if wm is not None and ts < wm - late:
            return "late", f"ts {ts} is more than {late / 1e6:g}s behind the watermark {wm}"
        if self.limit is not None and ts > self.limit:
            return "future", (f"ts {ts} is more than {self.max_future_us / 1e6:g}s ahead of the clock {now_us} "
                              f"(max_future_s)")
        if replayed:  # not in its entity's state although its batch's state is written: it was refused then
            return "future", f"ts {ts} was too far ahead of the clock when first consumed (max_future_s)"
        return None

    @staticmethod
    def _state(key: str, cache: dict[str, dict[str, Any]], get: StateGet) -> dict[str, Any]:
        st = cache.get(key)
        if st is None:
            st = cache[key] = get(key) or {"_o": {}, "v": {}}
        return st

    def _watermark(self, tp: tuple[str, int], get: StateGet) -> int | None:
        """The topic-partition's watermark, never ahead of the clock by more than ``max_future_s``."""
        if tp not in self.loaded:
            self.loaded.add(tp)
            saved = get(f"{WATERMARK_PREFIX}{tp[0]}|{tp[1]}")
            if saved is not None:
                if saved.get("wm") is not None:
                    self.watermarks[tp] = saved["wm"]
                self.ends[tp] = saved.get("e", -1)
        wm = self.watermarks.get(tp)
        if wm is not None and self.limit is not None and wm > self.limit:  # saved before the bound, or the
            wm = self.watermarks[tp] = self.limit  # clock stepped back: never further ahead than the bound
        return wm

    # --- stream feature views -------------------------------------------------------------------

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

    def _aggregate(self, accepted: list[Accepted], cache: dict[str, dict[str, Any]], out: BatchOutput,
                   now_us: int, only: set[str] | None = None) -> None:
        for topic, views in self.by_topic.items():
            mine = [a for a in accepted if a[0].topic == topic]
            if not mine:
                continue
            for view in views:
                if only is not None and view.name not in only:
                    continue
                inputs = self._view_inputs(view, [a[1] for a in mine])
                done: list[Accepted] = []
                vals: list[dict[str, Any]] = []
                for a, vrow in zip(mine, inputs, strict=True):
                    if vrow is None:
                        continue
                    _r, row, key = a
                    ts = row["ts"]
                    vst = cache[key]["v"].get(view.name)
                    if vst is None:
                        vst = cache[key]["v"][view.name] = {"t": ts, "b": {}}
                    ts_s = ts / 1e6
                    windows.update(vst, view, vrow, ts_s)
                    if ts > vst["t"]:
                        vst["t"] = ts
                    out.touched[key].add(view.name)
                    done.append(a)
                    v = windows.values(vst, view, ts_s)
                    vals.append(v)
                    self.newest[(key, view.name)] = (ts, v)
                if done:  # one append per column (created: distinct, in row order)
                    first = now_us + len(out.offline.get(view.name, {}).get("_offset", ()))
                    out.add_columns(view.name, {
                        view.entity_key: [row[view.entity_key] for _r, row, _k in done],
                        **{name: [v[name] for v in vals] for name in vals[0]},
                        "event_timestamp": [row["ts"] for _r, row, _k in done],
                        "created": list(range(first, first + len(done))), **_origins(done)})

    def _bronze(self, accepted: list[Accepted], out: BatchOutput, now_us: int) -> None:
        by_topic: dict[str, list[Accepted]] = defaultdict(list)
        for a in accepted:
            by_topic[a[0].topic].append(a)
        for topic, mine in by_topic.items():  # columns in the declared order, whatever the records' key order
            out.add_columns(bronze_table(topic), {
                **{k: [row[k] for _r, row, _k in mine] for k in columns(self.topics[topic])},
                "event_timestamp": [row["ts"] for _r, row, _k in mine], "ingested_at": [now_us] * len(mine),
                **_origins(mine)})

    # --- label joins ----------------------------------------------------------------------------

    def _join(self, r: Record, row: dict[str, Any], key: str, st: dict[str, Any], out: BatchOutput, applied: bool,
              cache: dict[str, dict[str, Any]], get: StateGet) -> None:
        """Apply one record to the label joins (unless it was applied before a crash), then close the joins
        its watermark passed."""
        if applied:
            for m in self.scored_by.get(r.topic, ()):
                self._scored(m, r, row, key, st)
            for m in self.outcome_of.get(r.topic, ()):
                self._outcome(m, r, row, key, st, out)
            for m in self.field_of.get(r.topic, ()):
                self._field_label(m, r, row, key, out)
        for m in self.finalise_on.get(r.topic, ()):
            wm = self._watermark((m.label.topic, r.partition), get)
            if wm is not None:
                self._finalise(m, r.partition, wm, r, cache, get, out)

    def _scored(self, m: ModelSpec, r: Record, row: dict[str, Any], key: str, st: dict[str, Any]) -> None:
        eid, ts = row["event_id"], row["ts"]
        if eid in st.get("f", {}).get(m.name, ()):
            return  # a copy of an event already labelled
        joins = st.setdefault("l", {}).setdefault(m.name, {})
        e = joins.get(eid)
        if e is None:
            joins[eid] = [ts, None, None, r.partition, None]
        elif e[0] is None:  # its outcome came first
            e[0], e[4] = ts, None
        else:
            return  # a copy of an event in flight
        heapq.heappush(self.due[(m.name, r.partition)], (ts + self.window_us(m), key, eid))

    def _outcome(self, m: ModelSpec, r: Record, row: dict[str, Any], key: str, st: dict[str, Any],
                 out: BatchOutput) -> None:
        eid, ts = row[m.label.id_field], row["ts"]
        if eid in st.get("f", {}).get(m.name, ()):
            out.late_outcomes[m.name] += 1
            out.dlq.append((r, "late_outcome", f"model {m.name}: the label of event {eid} was final before "
                                               f"this outcome arrived"))
            return
        value = None
        if m.label.value_field is not None:
            try:
                value = self._label_value(m, row[m.label.value_field])
            except ValueError as e:
                out.dlq.append((r, "invalid_label", f"model {m.name}: {e}"))
                return
        joins = st.setdefault("l", {}).setdefault(m.name, {})
        e = joins.get(eid)
        if e is None:  # the scored event has not arrived (yet)
            joins[eid] = [None, ts, value, r.partition, [[r.offset, row]]]
            self.waiting.add(key)
            return
        if e[0] is None:
            e[4].append([r.offset, row])
        if e[1] is None or ts < e[1]:
            e[1], e[2] = ts, value

    @staticmethod
    def _label_value(m: ModelSpec, v: Any) -> float:
        """A label value as the model's float: a class index (multiclass), 0/1 (binary) or the number."""
        if m.task == "multiclass":
            try:
                return float(m.classes.index(str(v)))
            except ValueError:
                raise ValueError(f"label {v!r} is not one of the classes {m.classes}") from None
        if isinstance(v, str):
            raise ValueError(f"label {v!r} is not a number")
        x = float(v)
        if m.task == "binary" and x not in (0.0, 1.0):
            raise ValueError(f"binary label {v!r} is not 0 or 1")
        return x

    def _field_label(self, m: ModelSpec, r: Record, row: dict[str, Any], key: str, out: BatchOutput) -> None:
        try:
            value = self._label_value(m, row[m.label.value_field or "label"])
            lb = Label(model_name=m.name, key=key.split("=", 1)[1], label=value, event_id=row[m.label.id_field],
                       ts=row["ts"])
        except (ValueError, ValidationError) as e:
            out.dlq.append((r, "invalid_label", f"model {m.name}: {str(e).splitlines()[0]}"))
            return
        out.labels.append((LabelRow(lb.model_name, lb.key, lb.label, lb.event_id, lb.ts), r))

    def _finalise(self, m: ModelSpec, p: int, wm: int, trigger: Record, cache: dict[str, dict[str, Any]],
                  get: StateGet, out: BatchOutput) -> None:
        """Emit the labels of ``m``'s scored events on partition ``p`` whose window the watermark passed."""
        heap = self.due.get((m.name, p))
        window = self.window_us(m)
        while heap and heap[0][0] <= wm:
            _, key, eid = heapq.heappop(heap)
            st = self._state(key, cache, get)
            e = st.get("l", {}).get(m.name, {}).pop(eid, None)
            if e is None or e[0] is None:
                continue
            s_ts, o_ts, value = e[0], e[1], e[2]
            hit = o_ts is not None and o_ts - s_ts <= window
            st.setdefault("f", {}).setdefault(m.name, {})[eid] = s_ts
            if key not in out.states:
                out.states[key] = (st, trigger)
            if m.task == "binary":
                label = 1.0 if hit else 0.0
            elif hit:
                label = value
            else:
                out.unlabelled[m.name] += 1
                continue
            out.labels.append((LabelRow(m.name, key.split("=", 1)[1], label, eid, s_ts), trigger))

    def _fallback_finalise(self, last_ok: dict[tuple[str, int], Record], cache: dict[str, dict[str, Any]],
                           get: StateGet, out: BatchOutput, caught_up: CaughtUp | None) -> None:
        """Close joins by the scored topic's watermark on partitions where the outcome topic has none yet (at
        the batch's end, so outcomes of the same batch still count) and none is waiting in the broker (a new
        consumer on a backlog may fetch the scored topic first)."""
        for (topic, p), r in last_ok.items():
            for m in self.scored_by.get(topic, ()):
                wm = self._watermark((topic, p), get)
                if (wm is not None and self._watermark((m.label.topic, p), get) is None
                        and (caught_up is None or caught_up(m.label.topic, p))):
                    self._finalise(m, p, wm, r, cache, get, out)

    def _join_watermark(self, m: ModelSpec, p: int, get: StateGet) -> int | None:
        wm = self._watermark((m.label.topic, p), get)
        return wm if wm is not None else self._watermark((m.topic, p), get)

    def _prune_joins(self, key: str, st: dict[str, Any], r: Record, get: StateGet, out: BatchOutput) -> None:
        """Forget final ids no outcome can count for any more; dead-letter outcomes whose scored event never
        came. Final ids are forgotten in the order they became final, up to the first one still needed (one
        behind it waits for a later prune: keeping an id longer changes nothing), so a prune reads only what it
        removes; the joins are read only for entities with outcomes waiting (``waiting``)."""
        for part in ("l", "f"):
            for name in [n for n in st.get(part, {}) if n not in self.models or not st[part][n]]:
                del st[part][name]
        if key in self.waiting:
            self._prune_unmatched(key, st, r, get, out)
        for name, final in st.get("f", {}).items():
            m = self.models[name]
            wm = self._join_watermark(m, r.partition, get)
            scored_wm = self._watermark((m.topic, r.partition), get)
            if wm is not None and scored_wm is not None:  # a copy of a scored event comes by the scored topic's
                wm = min(wm, scored_wm)  # clock: outcomes read far ahead must not forget it before the copy
            if wm is not None:
                horizon = wm - 2 * self.window_us(m) - self.lateness_us[m.label.topic]
                stale = []
                for eid, t in final.items():
                    if t >= horizon:
                        break
                    stale.append(eid)
                for eid in stale:
                    del final[eid]

    def _prune_unmatched(self, key: str, st: dict[str, Any], r: Record, get: StateGet, out: BatchOutput) -> None:
        """Dead-letter the outcomes of ``key`` whose scored event did not come within ``UNMATCHED_HORIZON``
        windows."""
        entity = key.split("=", 1)[1].encode()
        left = False
        for name, joins in st.get("l", {}).items():
            m = self.models[name]
            wm = self._join_watermark(m, r.partition, get)
            if wm is None:
                left = left or any(e[0] is None for e in joins.values())
                continue
            horizon = wm - UNMATCHED_HORIZON * self.window_us(m)
            for eid in [i for i, e in joins.items() if e[0] is None and e[1] < horizon]:
                e = joins[eid]
                for off, rec in e[4]:
                    if rec["ts"] < horizon:
                        out.dlq.append((Record(m.label.topic, r.partition, off, entity, orjson.dumps(rec)),
                                        "unmatched_outcome", f"model {m.name}: scored event {eid} did not arrive "
                                                             f"within {UNMATCHED_HORIZON} label windows"))
                e[4] = [o for o in e[4] if o[1]["ts"] >= horizon]
                if not e[4]:
                    del joins[eid]
                    continue
                first = min(e[4], key=lambda o: o[1]["ts"])[1]  # the earliest outcome left
                e[1] = first["ts"]
                e[2] = self._label_value(m, first[m.label.value_field]) if m.label.value_field else None
            left = left or any(e[0] is None for e in joins.values())
        if not left:
            self.waiting.discard(key)

    # --- views added later --------------------------------------------------------------------------

    def seed(self, topic: str, partition: int, views: list[ViewSpec], chunks: Iterable[list[dict[str, Any]]],
             get: StateGet, now_us: int | None = None) -> Iterator[BatchOutput]:
        """Replay one topic-partition's accepted events (bronze rows with ``_offset``, in offset order, in
        chunks) through ``views`` only: what the stream would have produced had they existed from the start.
        Yields one output per chunk with the views' offline rows, then a last one with each entity's online
        row and state. Events past an entity's applied offset (``_o``) are left to the stream, which replays
        them; an entity whose state has a view already is not replayed through it (a repeated seed, or a
        view the stream computed for it), so seeding twice counts nothing twice."""
        now_us = now_us or time.time_ns() // 1000
        self.limit = None if self.max_future_us is None else now_us + self.max_future_us
        only, okey = {v.name for v in views}, f"{topic}:{partition}"
        cache: dict[str, dict[str, Any]] = {}
        touched: dict[str, tuple[dict[str, Any], Record]] = {}
        lacking: dict[str, set[str]] = {}  # entity → the views its state lacked (a repeated seed skips the rest)
        for chunk in chunks:
            out, accepted = BatchOutput(), []
            for row in chunk:
                offset = row.pop("_offset")
                key = self.entity_key(topic, row)
                st = self._state(key, cache, get)
                if key not in lacking:
                    lacking[key] = {n for n in only if n not in st["v"]}
                if offset > st["_o"].get(okey, -1) or not lacking[key]:
                    continue
                r = Record(topic, partition, offset, None, None)
                touched[key] = (st, r)
                accepted.append((r, row, key))
                out.offsets[(topic, partition)] = offset
            for name in only:
                self._aggregate([a for a in accepted if name in lacking[a[2]]], cache, out, now_us, {name})
            out.accepted = len(accepted)
            yield out
        out = BatchOutput()
        for key, (st, r) in touched.items():
            out.states[key] = (st, r)
            out.touched[key].update(n for n in lacking[key] if n in st["v"])
        self._online_rows(out, get, now_us)
        yield out

    def _online_rows(self, out: BatchOutput, get: StateGet, now_us: int) -> None:
        """Online rows at each updated entity's newest time; prune view state behind the watermark."""
        by_name = {v.name: v for v in self.views}
        for key, names in out.touched.items():
            st, r = out.states[key]
            entity = key.split("=", 1)[1]
            for name in names:
                view = by_name[name]
                vst = st["v"][name]
                last = self.newest.get((key, name))  # the values after its last event, if that was its newest
                online = last[1] if last is not None and last[0] == vst["t"] else \
                    windows.values(vst, view, vst["t"] / 1e6)
                out.online.setdefault(name, []).append(
                    {view.entity_key: view.entity(entity), **online,
                     "event_timestamp": vst["t"], "created": now_us})
                wm = self._watermark((view.topic, r.partition), get)
                if wm is not None:  # after the online value: an idle entity keeps its value at its last time
                    windows.prune(vst, view, wm / 1e6)
        self.newest.clear()

    def _finish(self, cache: dict[str, dict[str, Any]], out: BatchOutput, get: StateGet, now_us: int) -> None:
        """Online rows at each updated entity's newest time; prune state behind the watermark."""
        self._online_rows(out, get, now_us)
        for key, (st, r) in out.states.items():
            if not key.startswith("_") and ("l" in st or "f" in st):
                self._prune_joins(key, st, r, get, out)
