"""The I/O-free feature engine (``streams/engine.py``) on its own, with the ads example's views and ``ctr`` label
join, against an independent pandas computation of the documented rules (``features/windows.py``'s and the
engine's docstrings): out-of-order, late and future events, event times on bucket and label-window edges,
re-sent records (same ``event_id``, a new offset), random micro-batches, and a kill -9 (rows written, state
partly lost) followed by a replay of records already applied.

The app's sinks are emulated as the app writes them: Delta tables keep a row only above the offsets recorded
for its table (``OfflineSink``), the labels table a row unless a batch lost in the crash wrote its label
(``LabelSink``: at or after the restarted engine's label floor of its model and partition), the online store
keeps the last row written per entity, the state table is a dict written after each batch (after a crash: a
prefix of each changelog partition's records)."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftloop.core.declarations import Declarations
from driftloop.features.declare import resolve
from driftloop.features.repo import init_repo, load_repo
from driftloop.features.windows import ViewSpec, specs_from_feast
from driftloop.streams.engine import BatchOutput, FeatureEngine, Record

T = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, a multiple of every slide of the example (10 s, 30 s, 1 min)
S = 1_000_000
NOW = T + 3600 * S  # the engine's clock: every event of the traffic is in its past, but the skewed ones
BOUND_S = 60.0
IMP, CLICK = "events.impressions", "events.clicks"
PARTITION = {"u0": 0, "u1": 1, "u2": 0, "u3": 1}  # entity → partition, the same on both topics
GAPS = (0, 1, 5, 10, 30)  # seconds between impressions
EDGES = (0, 0, -1, 1)  # µs around whole seconds, so event times fall on and beside bucket edges
LAGS = (0, 0, 1, 2 * S, 5 * S, 5 * S + 1, 9 * S)  # send time − event time; the lateness is 5 s
CLICK_DELAYS = (-S, 0, 1, 5 * S, 5 * S + 1, 8 * S)  # click time − impression time; the label window is 5 s
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ads(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[ViewSpec], Declarations]:
    """The ads example's stream views and declarations, resolved as ``driftloop apply`` does (no registry)."""
    repo = tmp_path_factory.mktemp("ads_repo")
    init_repo(repo, "ads")
    objs = load_repo(repo)
    from feast import StreamFeatureView  # noqa: PLC0415 (after load_repo, which imports Feast anyway)

    return specs_from_feast([o for o in objs.feast if isinstance(o, StreamFeatureView)]), resolve(objs, repo)


# --- traffic ------------------------------------------------------------------------------------------


@st.composite
def traffic(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Records in consumption order: impressions, clicks naming them (some before their impression), copies of
    records sent again later, and impressions of a producer whose clock is past the bound."""
    users = st.sampled_from(sorted(PARTITION))
    imps, send = [], T + 20 * S
    for i in range(draw(st.integers(1, 12))):
        send += draw(st.sampled_from(GAPS)) * S
        imps.append({"topic": IMP, "event_id": f"i{i}", "user": draw(users), "ts": send + draw(st.sampled_from(EDGES)),
                     "bid": draw(st.sampled_from((0.5, 1.25, 2.0)))})
    clicks = []
    for k, (i, delay) in enumerate(draw(st.lists(st.tuples(st.integers(0, len(imps) - 1),
                                                           st.sampled_from(CLICK_DELAYS)), max_size=8))):
        imp = imps[i]
        clicks.append({"topic": CLICK, "event_id": f"c{k}", "user": imp["user"], "ts": imp["ts"] + delay,
                       "impression_id": imp["event_id"]})
    events = imps + clicks
    sends = [e["ts"] + draw(st.sampled_from(LAGS)) for e in events]
    for i, extra in draw(st.lists(st.tuples(st.integers(0, len(events) - 1), st.sampled_from((0, S, 20 * S))),
                                  max_size=3)):
        events.append(dict(events[i]))  # the same event sent again
        sends.append(sends[i] + extra)
    for j, ahead in enumerate(draw(st.lists(st.sampled_from((1, 10 * S, 600 * S)), max_size=3))):
        events.append({"topic": IMP, "event_id": f"f{j}", "user": draw(users), "ts": NOW + int(BOUND_S * S) + ahead,
                       "bid": 9.0})
        sends.append(draw(st.integers(T, send)))
    order = sorted(range(len(events)), key=lambda k: sends[k])
    # a click on every partition first, so the label joins always close by the clicks' watermark
    lead = [{"topic": CLICK, "event_id": f"w{u}", "user": u, "ts": T, "impression_id": "none"} for u in ("u0", "u1")]
    return lead + [events[k] for k in order]


def records(events: list[dict[str, Any]]) -> list[Record]:
    """Kafka records of ``events`` (offsets per topic-partition in order); also sets each event's partition,
    offset and consumption position ``seq``."""
    nxt: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for seq, e in enumerate(events):
        p = PARTITION[e["user"]]
        e.update(partition=p, offset=nxt[(e["topic"], p)], seq=seq)
        nxt[(e["topic"], p)] += 1
        body = {"schema_version": 1, "event_id": e["event_id"], "ts": e["ts"], "user_id": e["user"], "ad_id": "a1"}
        if e["topic"] == IMP:
            body.update(campaign_id="c1", device="mobile", country="US", position=1, bid=e["bid"])
        else:
            body["impression_id"] = e["impression_id"]
        out.append(Record(e["topic"], p, e["offset"], e["user"].encode(), orjson.dumps(body)))
    return out


def cuts(n: int) -> st.SearchStrategy[list[int]]:
    """Batch boundaries in ``range(n)``: the start of each micro-batch."""
    return st.lists(st.integers(1, max(1, n - 1)), max_size=6).map(lambda c: sorted({0, *[x for x in c if x < n]}))


# --- the app's sinks ------------------------------------------------------------------------------------


@dataclass
class Crash:
    """The batch a kill -9 interrupts: the Delta tables written (``None``: all, then the online rows and a
    prefix of each changelog partition's state records, ``kept[p]`` of them)."""

    tables: set[str] | None
    kept: dict[int, int] = field(default_factory=dict)


class Worker:
    """The engine with the app's sinks emulated (see the module docstring)."""

    def __init__(self, views: list[ViewSpec], decls: Declarations):
        self.views, self.decls = views, decls
        self.state: dict[str, Any] = {}
        self.done: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)  # Delta: table → recorded offsets
        self.rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.online: dict[tuple[str, str], dict[str, Any]] = {}
        self.dlq: set[tuple[str, str, int, int]] = set()  # reason, topic, partition, offset
        self.restart()

    def restart(self) -> None:
        self.engine = FeatureEngine(self.views, self.decls, max_future_s=BOUND_S)
        self.engine.reset(self.state.items())
        floors = self.engine.label_floors((0, 1), self.get, now_us=NOW)
        self.lost_labels = {(r["model_name"], r["event_id"]) for r in self.rows["labels"]
                            if (lo := floors.get((r["model_name"], r["_partition"]), -1)) is None or r["ts"] >= lo}

    def get(self, key: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.state.get(key))

    def batch(self, recs: list[Record], now_us: int = NOW, crash: Crash | None = None) -> BatchOutput:
        out = self.engine.process(recs, self.get, now_us=now_us)
        for name, cols in out.offline.items():
            if crash is None or crash.tables is None or name in crash.tables:
                self._delta(name, cols, out.offsets)
        if crash is not None and crash.tables is not None:
            return out
        for name, rows in out.online.items():
            for row in rows:
                self.online[(name, row["user_id"])] = row
        self.dlq |= {(why, r.topic, r.partition, r.offset) for r, why, _ in out.dlq}
        seen: dict[int, int] = defaultdict(int)
        for key, (value, r) in out.states.items():
            seen[r.partition] += 1
            if crash is None or seen[r.partition] <= crash.kept.get(r.partition, 0):
                self.state[key] = value
        return out

    def _delta(self, name: str, cols: dict[str, list[Any]], offsets: dict[tuple[str, int], int]) -> None:
        done = self.done[name]
        rows = [dict(zip(cols, v, strict=True)) for v in zip(*cols.values(), strict=True)]
        if name == "labels":
            self.rows[name] += [r for r in rows if (r["model_name"], r["event_id"]) not in self.lost_labels]
        else:
            self.rows[name] += [r for r in rows if r["_offset"] > done.get((r["_topic"], r["_partition"]), -1)]
        done.update({tp: o for tp, o in offsets.items() if o > done.get(tp, -1)})

    def run(self, recs: list[Record], starts: list[int], crash: Crash | None = None, at: int = 0) -> None:
        for i, lo in enumerate(starts):
            hi = starts[i + 1] if i + 1 < len(starts) else len(recs)
            self.batch(recs[lo:hi], crash=crash if i == at else None)
            if crash is not None and i == at:
                return


# --- the reference (pandas, from the documented rules) -------------------------------------------------


def decide(ev: pd.DataFrame, lateness_us: dict[str, int]) -> pd.DataFrame:
    """Each record's fate: ``future`` beyond the clock's bound, ``late`` more than the lateness behind the highest
    event time accepted before it on its topic-partition, else accepted."""
    ev = ev.copy()
    ev["future"] = ev["ts"] > NOW + int(BOUND_S * S)
    ok = ev["ts"].where(~ev["future"]).astype(float)
    keys = [ev["topic"], ev["partition"]]
    wm = ok.groupby(keys).cummax().groupby(keys).ffill().groupby(keys).shift()
    ev["late"] = ~ev["future"] & (ev["ts"] < wm - ev["topic"].map(lateness_us))
    ev["accepted"] = ~ev["future"] & ~ev["late"]
    return ev


def window_values(members: pd.DataFrame, queries: pd.DataFrame, view: ViewSpec) -> pd.DataFrame:
    """Per query (``qid``, ``user``, ``at``, ``upto``): each aggregation of ``view`` over the user's members
    (``seq``, ``ts``, columns) consumed at or before ``upto`` whose bucket ``ts // slide`` lies in
    ``(b(at) - ceil(window / slide), b(at)]`` (integer µs: exact on the edges)."""
    pairs = queries.merge(members, on="user")
    pairs = pairs[pairs["seq"] <= pairs["upto"]]
    out = pd.DataFrame(index=pd.Index(queries["qid"], name="qid"))
    for a in view.aggs:
        slide, n = round(a.bucket_s * S), math.ceil(a.window_s / a.bucket_s)
        b, bj = pairs["at"] // slide, pairs["ts"] // slide
        inside = pairs[(bj > b - n) & (bj <= b)]
        x = inside[a.column].map(lambda v: v if isinstance(v, float) else 1.0).groupby(inside["qid"])
        got = getattr(x, a.function)().reindex(out.index)
        out[a.name] = got.fillna(0) if a.function == "count" else got
    return out


def expected_labels(ev: pd.DataFrame, window_us: int) -> dict[str, tuple[float, str, int]]:
    """The ``ctr`` labels (event id → label, key, scored ts): a scored event's label is final at the first record
    after which the clicks' watermark of its partition reaches its time + window; 1 if a click naming it was
    consumed by then at most a window after it, else 0. Copies of a scored event join as the first."""
    acc = ev[ev["accepted"]]
    clicks = acc[acc["topic"] == CLICK]
    out = {}
    for s in acc[acc["topic"] == IMP].drop_duplicates("event_id").itertuples():
        pc = clicks[clicks["partition"] == s.partition]
        reached = pc["seq"][pc["ts"].cummax() >= s.ts + window_us]
        if reached.empty:
            continue  # not final yet
        final_at = max(s.seq, reached.min())
        counted = pc[(pc["impression_id"] == s.event_id) & (pc["seq"] <= final_at)]
        out[s.event_id] = (float(((counted["ts"] - s.ts) <= window_us).any()), s.user, s.ts)
    return out


def close(got: pd.Series, want: pd.Series) -> np.ndarray:
    a, b = pd.to_numeric(got).to_numpy(float), pd.to_numeric(want).to_numpy(float)
    return np.isclose(a, b, rtol=1e-9, atol=1e-9) | (np.isnan(a) & np.isnan(b))


def check(w: Worker, events: list[dict[str, Any]]) -> None:
    """Offline rows, the online rows, labels and dead letters of ``w`` equal the reference for ``events``."""
    lateness = {t: round(max([s.lateness_s, *(v.lateness_s for v in w.views if v.topic == t)]) * S)
                for t, s in w.decls.topics.items()}
    ev = decide(pd.DataFrame(events), lateness)
    for reason in ("late", "future"):
        want = {(reason, e.topic, e.partition, e.offset) for e in ev[ev[reason]].itertuples()}
        assert {d for d in w.dlq if d[0] == reason} == want, reason
    acc = ev[ev["accepted"]]
    for v in w.views:
        mine = acc[acc["topic"] == v.topic]
        members = mine[["user", "seq", "ts", *{a.column for a in v.aggs}]]
        names = [a.name for a in v.aggs]
        got = pd.DataFrame(w.rows[v.name])
        assert len(got) == len(mine), f"{v.name}: {len(got)} offline rows for {len(mine)} accepted events"
        if mine.empty:
            continue
        got = got.merge(mine[["topic", "partition", "offset", "seq", "ts"]], validate="one_to_one",
                        left_on=["_topic", "_partition", "_offset"], right_on=["topic", "partition", "offset"])
        assert (got["event_timestamp"] == got["ts"]).all()
        queries = pd.DataFrame({"qid": mine["seq"], "user": mine["user"], "at": mine["ts"], "upto": mine["seq"]})
        want = window_values(members, queries, v).loc[got["seq"]]
        for n in names:
            assert close(got[n], want[n]).all(), f"{v.name}.{n} offline: got {got[n].tolist()} want {want[n].tolist()}"
        last = mine.groupby("user").agg(at=("ts", "max"), upto=("seq", "max")).reset_index()
        want_on = window_values(members, last.assign(qid=range(len(last))), v)
        online = pd.DataFrame([w.online[(v.name, u)] for u in last["user"]])
        assert (online["event_timestamp"].to_numpy() == last["at"].to_numpy()).all(), f"{v.name} online time"
        for n in names:
            assert close(online[n], want_on[n].reset_index(drop=True)).all(), f"{v.name}.{n} online"
    ctr = w.decls.models["ctr"]
    labels = pd.DataFrame(w.rows["labels"], columns=["event_id", "label", "key", "ts"])
    assert labels["event_id"].is_unique, "a label row written twice"
    got_labels = {r.event_id: (r.label, r.key, r.ts) for r in labels.itertuples()}
    assert got_labels == expected_labels(ev, round(ctr.label.window_s * S))


# --- properties --------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_matches_pandas_in_any_micro_batches(ads, data: st.DataObject) -> None:
    events = data.draw(traffic())
    recs = records(events)
    w = Worker(*ads)
    w.run(recs, data.draw(cuts(len(recs))))
    check(w, events)


@SETTINGS
@given(data=st.data())
def test_exact_after_a_kill9_and_replay(ads, data: st.DataObject) -> None:
    """A batch's Delta rows (some or all tables) are written and its state partly, then the worker restarts
    and the stream is replayed from an earlier batch: records applied before are skipped, nothing counts twice
    or goes missing."""
    events = data.draw(traffic())
    recs = records(events)
    starts = data.draw(cuts(len(recs)))
    at = data.draw(st.integers(0, len(starts) - 1))
    tables = data.draw(st.none() | st.sets(st.sampled_from(["bronze_impressions", "bronze_clicks", "labels",
                                                             *(v.name for v in ads[0])])))
    crash = Crash(tables, {p: data.draw(st.integers(0, 12)) for p in (0, 1)})
    w = Worker(*ads)
    w.run(recs, starts, crash, at)
    w.restart()
    start = starts[data.draw(st.integers(0, at))]
    w.run(recs[start:], data.draw(cuts(len(recs) - start)))
    check(w, events)


# --- the clock bound -----------------------------------------------------------------------------------


def imp(eid: str, ts: int, user: str = "u0") -> dict[str, Any]:
    return {"topic": IMP, "event_id": eid, "user": user, "ts": ts, "bid": 1.0}


BOUND = int(BOUND_S * S)


def test_future_events_are_refused_and_never_move_the_watermark(ads) -> None:
    events = [imp("skewed", NOW + BOUND + 1), imp("other", NOW - 10 * S, "u1"), imp("on_time", NOW - 20 * S),
              imp("at_bound", NOW + BOUND, "u2")]
    recs = records(events)
    w = Worker(*ads)
    out = w.batch(recs[:3])
    [(r, reason, detail)] = out.dlq
    assert (r.offset, reason) == (0, "future")
    assert f"ts {NOW + BOUND + 1} " in detail and f"{BOUND_S:g}s ahead of the clock {NOW}" in detail
    assert out.accepted == 2 and w.state["_wm|events.impressions|0"]["wm"] == NOW - 20 * S  # on_time not late
    # at the bound exactly an event is accepted: the watermark it moves is at most the bound ahead
    w.batch(recs[3:])
    assert w.state["_wm|events.impressions|0"] == {"wm": NOW + BOUND, "e": 2}


def test_a_replay_with_a_later_clock_decides_as_the_first_run(ads) -> None:
    """Refused as ``future`` in a batch whose state was written, an event is refused again on replay although
    the clock has caught up with it, and one skipped (its entity applied a later record) does not move the
    watermark."""
    events = [imp("ahead", NOW + BOUND + 5 * S, "u1"), imp("ahead_too", NOW + BOUND + 5 * S),
              imp("on_time", NOW - 20 * S), imp("other", NOW - 20 * S, "u3")]
    recs = records(events)
    w = Worker(*ads)
    w.batch(recs)
    assert w.dlq == {("future", IMP, 1, 0), ("future", IMP, 0, 0)}
    w.restart()
    out = w.batch(recs, now_us=NOW + 10 * S)  # the clock moved on: both are within the bound now
    assert [(r.offset, r.partition, why) for r, why, _ in out.dlq] == [(0, 1, "future")]
    assert out.accepted == 0 and out.skipped == 3
    assert w.state["_wm|events.impressions|0"]["wm"] == w.state["_wm|events.impressions|1"]["wm"] == NOW - 20 * S
    assert not w.rows["user_impressions"] or set(pd.DataFrame(w.rows["user_impressions"])["_offset"]) == {1}


def test_a_saved_watermark_beyond_the_bound_is_clamped(ads) -> None:
    """A watermark saved before the bound existed (a producer 10 minutes ahead) counts as the bound ahead of the
    clock, for lateness and for label joins alike."""
    w = Worker(*ads)
    for topic in (IMP, CLICK):
        w.state[f"_wm|{topic}|0"] = {"wm": NOW + 600 * S, "e": -1}
    w.restart()
    w.batch(records([imp("s", NOW + BOUND - 2 * S)]))  # 3 s behind the clamped watermark: not late
    assert not w.dlq and w.state["_wm|events.impressions|0"]["wm"] == NOW + BOUND
    assert not w.rows["labels"], "its label join was closed by the watermark beyond the bound"


def test_the_traffic_fits_the_example(ads) -> None:
    """The traffic above is shaped for the ads example: its topics, the lateness and the ctr label join."""
    views, decls = ads
    assert set(decls.topics) == {IMP, CLICK} and {v.lateness_s for v in views} == {5.0}
    ctr = decls.models["ctr"]
    assert (ctr.topic, ctr.label.topic, ctr.label.id_field, ctr.label.window_s) == (IMP, CLICK, "impression_id", 5.0)


# --- a view added later ---------------------------------------------------------------------------------


def seed(w: Worker, views: list[ViewSpec]) -> None:
    """What the app does for views the state lacks: replay each partition's bronze rows through them
    (``FeatureEngine.seed``), the offline rows deduplicated by the seed's own offsets, then state and online."""
    done: dict[tuple[str, str, int], int] = {}
    for topic in {v.topic for v in views}:
        for p in sorted(set(PARTITION.values())):
            bronze = sorted((r for r in w.rows[f"bronze_{topic.split('.')[-1]}"] if r["_partition"] == p),
                            key=lambda r: r["_offset"])
            rows = [{k: v for k, v in r.items() if k not in ("event_timestamp", "ingested_at", "_topic",
                                                               "_partition")} for r in bronze]
            chunks = [rows[i:i + 3] for i in range(0, len(rows), 3)]
            for out in w.engine.seed(topic, p, [v for v in views if v.topic == topic], chunks, w.get, now_us=NOW):
                for name, cols in out.offline.items():
                    for row in (dict(zip(cols, v, strict=True)) for v in zip(*cols.values(), strict=True)):
                        if row["_offset"] > done.get((name, topic, p), -1):
                            w.rows[name].append(row)
                    done.update({(name, t, q): o for (t, q), o in out.offsets.items()})
                for name, online in out.online.items():
                    for row in online:
                        w.online[(name, row["user_id"])] = row
                for key, (value, _r) in out.states.items():
                    w.state[key] = value


@SETTINGS
@given(data=st.data())
def test_a_view_added_later_starts_where_the_data_starts(ads, data: st.DataObject) -> None:
    """The engine runs without one view, then restarts with it: seeded from the bronze rows, its offline rows,
    online values and windows equal the pandas reference over every event, as if it had existed from the start;
    a second seed (a crash before the marker) changes nothing."""
    views, decls = ads
    added = data.draw(st.sampled_from([v for v in views if v.topic == IMP]))
    events = data.draw(traffic())
    recs = records(events)
    split = data.draw(st.integers(0, len(recs)))
    w = Worker([v for v in views if v is not added], decls)
    w.run(recs[:split], data.draw(cuts(split)) if split else [])
    w.views = views
    w.restart()
    seed(w, [added])
    if data.draw(st.booleans()):  # a crash before the app's marker: the seed runs again, counting nothing twice
        w.restart()
        seed(w, [added])
    w.restart()
    if split < len(recs):
        w.run(recs[split:], data.draw(cuts(len(recs) - split)))
    check(w, events)


def test_a_record_keyed_by_another_entity_is_dead_lettered(ads) -> None:
    """The partition that owns an entity is chosen by the record key: a key that is not the entity's field
    would count the event in another partition's state, so it is refused (``key``); a null key is fine."""
    [wrong, null, right] = records([imp("a", T, "u0"), imp("b", T + S, "u0"), imp("c", T + 2 * S, "u0")])
    wrong.key, null.key = b"u2", None
    out = Worker(*ads).batch([wrong, null, right])
    assert [(r.offset, why) for r, why, _ in out.dlq] == [(0, "key")]
    assert "user_id 'u0'" in out.dlq[0][2] and out.accepted == 2


def test_a_copy_of_a_scored_event_gets_no_second_label_while_outcomes_run_ahead(ads) -> None:
    """A producer that re-sends (idempotence off) writes a scored event twice. While the outcome topic is read
    far ahead of the scored one (a backlog), the label is final the moment the event arrives; the copy a batch
    later must find it final, not open a second join (the chaos loop wrote 2 labels twice this way)."""
    click = {"topic": CLICK, "event_id": "c", "user": "u0", "ts": T + 300 * S, "impression_id": "x"}
    recs = records([click, imp("dup", T), imp("dup", T + 1)])
    w = Worker(*ads)
    w.batch(recs[:2])
    w.batch(recs[2:])
    assert [(r["event_id"], r["label"]) for r in w.rows["labels"]] == [("dup", 0.0)]
