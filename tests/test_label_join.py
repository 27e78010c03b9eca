"""The engine's label joins without I/O: ``FeatureEngine.process`` on hand-made records, with the state
kept in a dict as the app keeps it (the engine's state records written back after each batch)."""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from driftloop.core import delta
from driftloop.core.contracts import Label
from driftloop.core.declarations import Declarations, LabelSpec, ModelSpec, TopicSpec
from driftloop.streams.engine import UNMATCHED_HORIZON, BatchOutput, FeatureEngine, LabelRow, Record
from driftloop.streams.sinks import LabelSink

T0 = 1_700_000_000_000_000
S = 1_000_000  # one second in µs
SCORED, OUTCOME, FINAL, LABELS = "ev.scored", "ev.outcome", "ev.final", "ev.labels"
TOPICS = {
    SCORED: TopicSpec(name=SCORED, key="user_id", fields={"user_id": "string", "x": "double"}),
    OUTCOME: TopicSpec(name=OUTCOME, key="user_id", fields={"user_id": "string", "scored_id": "string",
                                                            "value": "double", "grade": "string"}),
    FINAL: TopicSpec(name=FINAL, key="user_id", fields={"user_id": "string", "outcome_id": "string"}),
    LABELS: TopicSpec(name=LABELS, key="user_id", fields={"user_id": "string", "scored_id": "string",
                                                          "label": "double"}),
}
METRIC = {"binary": "log_loss", "regression": "rmse", "multiclass": "log_loss"}


def model(name: str, task: str = "binary", topic: str = SCORED, label_topic: str = OUTCOME, kind: str = "outcome",
          id_field: str = "scored_id", value_field: str | None = None, window_s: float = 5.0,
          classes: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(name=name, task=task, metric=METRIC[task], higher_is_better=False, topic=topic, key="user_id",
                     feature_service="fs", features=["x"], classes=list(classes),
                     label=LabelSpec(kind=kind, topic=label_topic, id_field=id_field, value_field=value_field,
                                     window_s=window_s))


def scored(eid: str, ts: int, user: str = "u1") -> tuple[str, dict]:
    return SCORED, {"event_id": eid, "ts": ts, "user_id": user, "x": 1.0}


def outcome(eid: str, of: str, ts: int, value: float = 0.0, grade: str = "A", user: str = "u1") -> tuple[str, dict]:
    return OUTCOME, {"event_id": eid, "ts": ts, "user_id": user, "scored_id": of, "value": value, "grade": grade}


class Harness:
    """The engine with its state in a dict; records get offsets per topic-partition in send order."""

    def __init__(self, *models: ModelSpec):
        self.decls = Declarations(topics=TOPICS, models={m.name: m for m in models})
        self.engine = FeatureEngine([], self.decls)
        self.state: dict[str, Any] = {}
        self.next: dict[tuple[str, int], int] = defaultdict(int)
        self.outs: list[BatchOutput] = []

    def record(self, topic: str, rec: dict, partition: int = 0) -> Record:
        off = self.next[(topic, partition)]
        self.next[(topic, partition)] += 1
        body = {"schema_version": 1, **rec}
        return Record(topic, partition, off, rec["user_id"].encode(), orjson.dumps(body))

    def send(self, *events: tuple[str, dict], partition: int = 0) -> BatchOutput:
        return self.process([self.record(t, r, partition) for t, r in events])

    def get(self, key: str) -> dict | None:
        return copy.deepcopy(self.state.get(key))  # the store changes only when a batch's states are written

    def process(self, records: list[Record], durable: bool = True) -> BatchOutput:
        out = self.engine.process(records, self.get, now_us=T0)
        if durable:
            self.write(out, lambda key: True)
        self.outs.append(out)
        return out

    def write(self, out: BatchOutput, which: Any) -> None:
        for key, (value, _r) in out.states.items():
            if which(key):
                self.state[key] = value

    def restart(self) -> None:
        """A new worker: in-memory watermarks and timers gone, the label timers rebuilt from the state."""
        self.engine = FeatureEngine([], self.decls)
        self.engine.reset(self.state.items())

    def labels(self, name: str) -> dict[str, float]:
        got = [lb for o in self.outs for lb, _ in o.labels if lb.model_name == name]
        assert len({lb.event_id for lb in got}) == len(got), "a label emitted twice"
        return {lb.event_id: lb.label for lb in got}

    def dlq(self, reason: str) -> list[Record]:
        return [r for o in self.outs for r, why, _ in o.dlq if why == reason]


def reference(events: list[tuple[str, dict]], m: ModelSpec) -> dict[str, float]:
    """The label rule applied to complete data: per scored event, the earliest outcome naming it, if at most
    the window after it (binary: whether there is one)."""
    out: dict[str, float] = {}
    for t, s in events:
        if t != m.topic:
            continue
        mine = [o for t2, o in events if t2 == m.label.topic and o[m.label.id_field] == s["event_id"]]
        hits = sorted((o for o in mine if o["ts"] - s["ts"] <= m.label.window_s * 1e6), key=lambda o: o["ts"])
        if m.task == "binary":
            out[s["event_id"]] = 1.0 if hits else 0.0
        elif hits:
            v = hits[0][m.label.value_field]
            out[s["event_id"]] = float(m.classes.index(v)) if m.task == "multiclass" else float(v)
    return out


def test_binary_within_and_after_the_window():
    m = model("ctr")
    h = Harness(m)
    events = [scored("s1", T0), scored("s2", T0 + S), scored("s3", T0 + 2 * S), scored("s4", T0 + 3 * S, user="u2"),
              outcome("o1", "s1", T0 + 2 * S)]
    h.send(*events)
    assert h.labels("ctr") == {}, "no label is final before the outcome watermark passes its window"
    more = [outcome("o2", "s2", T0 + 6_500_000), outcome("o3", "s3", T0 + 6_800_000),  # 5.5 s, 4.8 s after
            outcome("o4", "s4", T0 + 8 * S, user="u2")]  # 5 s after: still inside
    h.send(*more)
    h.send(outcome("ox", "nothing", T0 + 30 * S))
    want = reference(events + more, m)
    assert want == {"s1": 1.0, "s2": 0.0, "s3": 1.0, "s4": 1.0}
    assert h.labels("ctr") == want
    assert not h.dlq("late_outcome")
    got = {lb.event_id: lb for o in h.outs for lb, _ in o.labels}
    assert got["s4"].key == "u2" and got["s4"].ts == T0 + 3 * S
    cols = {k: v for o in h.outs for k, v in o.offline.get("labels", {}).items()}
    assert set(cols) == {"model_name", "event_id", "key", "label", "ts", "event_timestamp", "created", "_topic",
                         "_partition", "_offset"}


def test_labels_wait_for_the_outcome_watermark_then_close():
    h = Harness(model("ctr"))
    h.send(scored("s1", T0), outcome("a", "zz", T0 + 4 * S))
    assert h.labels("ctr") == {}
    out = h.send(outcome("b", "zz", T0 + 5 * S))  # the watermark reaches s1 + window: final, no outcome
    assert [(lb.event_id, lb.label) for lb, _ in out.labels] == [("s1", 0.0)]
    assert out.offline["labels"]["_topic"] == [OUTCOME] and out.offline["labels"]["_offset"] == [1]


def test_outcome_before_its_scored_event():
    m = model("ctr")
    h = Harness(m)
    events = [outcome("o1", "s1", T0 + S), outcome("o9", "s9", T0 + 11 * S), outcome("w", "zz", T0 + 20 * S)]
    h.send(*events)
    late_scored = [scored("s1", T0), scored("s9", T0 + 10 * S), scored("s5", T0 + 12 * S)]
    out = h.send(*late_scored)
    # the outcome watermark passed all three already: each is final as it arrives, itself the trigger
    assert h.labels("ctr") == reference(events + late_scored, m) == {"s1": 1.0, "s9": 1.0, "s5": 0.0}
    assert out.offline["labels"]["_topic"] == [SCORED] * 3 and out.offline["labels"]["_offset"] == [0, 1, 2]
    assert not h.dlq("late_outcome")


def test_late_outcome_is_dead_lettered_and_counted():
    h = Harness(model("ctr"))
    h.send(scored("s1", T0), outcome("w", "zz", T0 + 6 * S))
    assert h.labels("ctr") == {"s1": 0.0}
    out = h.send(outcome("o1", "s1", T0 + 3 * S))  # inside the lateness, but the label is final
    assert h.labels("ctr") == {"s1": 0.0}
    assert out.late_outcomes == {"ctr": 1}
    [(r, reason, detail)] = out.dlq
    assert reason == "late_outcome" and "ctr" in detail and "s1" in detail
    assert r.topic == OUTCOME and orjson.loads(r.value)["event_id"] == "o1"


def test_regression_label_is_the_earliest_outcome_in_the_window():
    m = model("eta", "regression", value_field="value", window_s=10)
    h = Harness(m)
    events = [scored("s1", T0), scored("s2", T0 + S), scored("s3", T0 + 2 * S),
              outcome("a", "s1", T0 + 3 * S, value=7.5), outcome("b", "s2", T0 + 5 * S, value=2.0),
              outcome("c", "s2", T0 + 3 * S, value=9.0), outcome("d", "s3", T0 + 15 * S, value=1.0)]
    h.send(*events)
    h.send(outcome("w", "zz", T0 + 40 * S, value=0.0))
    want = reference(events, m)
    assert want == {"s1": 7.5, "s2": 9.0}
    assert h.labels("eta") == want
    assert sum((o.unlabelled for o in h.outs), Counter()) == {"eta": 1}  # s3: its only outcome came 13 s after


def test_multiclass_label_is_the_class_index():
    m = model("grade", "multiclass", value_field="grade", classes=("A", "B", "C"))
    h = Harness(m)
    events = [scored("s1", T0), scored("s2", T0), outcome("a", "s1", T0 + S, grade="C")]
    bad = outcome("b", "s2", T0 + S, grade="Z")
    h.send(*events, bad)
    h.send(outcome("w", "zz", T0 + 20 * S))
    assert h.labels("grade") == reference(events, m) == {"s1": 2.0}
    [r] = h.dlq("invalid_label")
    assert orjson.loads(r.value)["event_id"] == "b"


def test_field_labels():
    m = model("fraud", "binary", label_topic=LABELS, kind="field", value_field="label")
    h = Harness(m)
    recs = [{"event_id": "l1", "ts": T0 + 9 * S, "user_id": "u1", "scored_id": "s1", "label": 1.0},
            {"event_id": "l2", "ts": T0 + 10 * S, "user_id": "u2", "scored_id": "s2", "label": 0.0},
            {"event_id": "l3", "ts": T0 + 11 * S, "user_id": "u2", "scored_id": "s3", "label": 2.0}]
    out = h.send(scored("s1", T0), *[(LABELS, r) for r in recs])
    got = {lb.event_id: (lb.key, lb.label, lb.ts) for lb, _ in out.labels}
    assert got == {r["scored_id"]: (r["user_id"], r["label"], r["ts"]) for r in recs[:2]}
    assert [orjson.loads(r.value)["event_id"] for r in h.dlq("invalid_label")] == ["l3"]


def test_two_models_share_topics():
    ctr = model("ctr")
    eta = model("eta", "regression", value_field="value", window_s=3)
    chain = model("chain", topic=OUTCOME, label_topic=FINAL, id_field="outcome_id", window_s=2)
    h = Harness(ctr, eta, chain)
    events = [scored("s1", T0), scored("s2", T0 + S), scored("s3", T0 + 2 * S, user="u2"),
              outcome("o1", "s1", T0 + 2 * S, value=4.0), outcome("o2", "s2", T0 + 5 * S, value=5.0),
              outcome("o3", "s3", T0 + 6 * S, value=6.0, user="u2"),
              (FINAL, {"event_id": "f1", "ts": T0 + 3 * S, "user_id": "u1", "outcome_id": "o1"}),
              (FINAL, {"event_id": "f3", "ts": T0 + 7 * S, "user_id": "u2", "outcome_id": "o3"})]
    h.send(*events[:3])
    h.send(*events[3:])
    h.send(outcome("w", "zz", T0 + 60 * S), (FINAL, {"event_id": "fw", "ts": T0 + 60 * S, "user_id": "u1",
                                                      "outcome_id": "zz"}))
    for m in (ctr, eta, chain):
        assert h.labels(m.name) == reference(events, m), m.name
    assert h.labels("ctr") == {"s1": 1.0, "s2": 1.0, "s3": 1.0}
    assert h.labels("eta") == {"s1": 4.0}
    assert h.labels("chain") == {"o1": 1.0, "o2": 0.0, "o3": 1.0}


def test_unmatched_outcome_is_dead_lettered_when_pruned():
    h = Harness(model("ctr", window_s=1))
    h.send(outcome("o1", "never", T0, value=3.0))
    h.send(scored("s1", T0 + S), outcome("w", "zz", T0 + 2 * S))
    assert not h.dlq("unmatched_outcome")
    h.send(scored("s2", T0 + (UNMATCHED_HORIZON + 5) * S), outcome("w2", "zz", T0 + (UNMATCHED_HORIZON + 5) * S))
    dead = {orjson.loads(r.value)["event_id"]: r for r in h.dlq("unmatched_outcome")}
    assert set(dead) == {"o1", "w"}  # w named no scored event either; w2 is within the horizon still
    r = dead["o1"]
    assert (r.topic, r.partition, r.offset, r.key) == (OUTCOME, 0, 0, b"u1")
    assert orjson.loads(r.value) == {"schema_version": 1, "event_id": "o1", "ts": T0, "user_id": "u1",
                                     "scored_id": "never", "value": 3.0, "grade": "A"}
    # final ids are forgotten once no outcome could count for them: the state keeps only what can matter
    assert "s1" not in h.state["user_id=u1"].get("f", {}).get("ctr", {})


def _traffic(n: int) -> list[tuple[str, dict]]:
    """An outcome first (so the outcome watermark exists), then scored events, two in three followed by an
    outcome 2 or 4 s later (never later than the lateness, never after its label is final), then a far one."""
    out = [outcome("w0", "zz", T0)]
    for i in range(n):
        user = f"u{i % 3}"
        out.append(scored(f"s{i}", T0 + i * S // 2, user=user))
        if i % 3:
            out.append(outcome(f"o{i}", f"s{i}", T0 + i * S // 2 + (i % 3) * 2 * S, user=user))
    return [*out, outcome("w1", "zz", T0 + (n + 20) * S)]


class Labels:
    """The app's labels sink (``LabelSink``) on a real Delta table: each batch's label rows written as the app
    writes them; after a restart, reset with the restarted engine's label floors."""

    def __init__(self, root: Path, h: Harness):
        self.sink, self.h = LabelSink(root, app="test"), h

    def write(self, out: BatchOutput) -> None:
        if "labels" in out.offline:
            self.sink.write("labels", out.offline["labels"], out.offsets)

    def restart(self) -> None:
        self.h.restart()
        self.sink.reset(self.h.engine.label_floors([0], self.h.get))

    def rows(self) -> list[tuple[str, float]]:
        got = delta.read(self.sink.root / "labels")
        return list(zip(got["event_id"], got["label"], strict=True))


@pytest.mark.parametrize("split", [1, 4, 9])
def test_crash_and_replay_writes_each_label_once(split, tmp_path: Path):
    """A batch whose rows were written but whose state was partly lost (one entity's made it) is replayed from
    earlier offsets in other batches: the labels sink reads back the rows of the lost batch and skips them when
    their joins close again, so the Delta table keeps exactly one row per label. Every crash point and
    surviving entity of a small stream."""
    m = model("ctr")
    events = _traffic(30)
    clean = Harness(m)
    records = [clean.record(t, r) for t, r in events]
    clean.process(records)
    want = reference(events, m)
    assert clean.labels("ctr") == want and not clean.dlq("late_outcome")
    for start in range(12, 44, 4):
        for survivor in ("user_id=u0", "user_id=u1", "user_id=u2"):
            h = Harness(m)
            sink = Labels(tmp_path / f"{start}-{survivor}", h)
            for i in range(0, start, split):
                sink.write(h.process(records[i:min(i + split, start)]))
            crashed = h.process(records[start:start + 8], durable=False)
            sink.write(crashed)
            h.write(crashed, lambda key, keep=survivor: key == keep)
            sink.restart()
            for i in range(start - 10, len(records), split + 1):
                sink.write(h.process(records[i:i + split + 1]))
            rows = sink.rows()
            assert len(rows) == len({e for e, _ in rows}), f"a label row written twice (crash at {start})"
            assert dict(rows) == want, f"crash at {start}, {survivor}'s state kept"


def test_a_replay_that_closes_a_join_on_another_record_still_writes_it(tmp_path: Path):
    """The replay of a lost batch fetches the topics in another interleaving: an outcome beyond the lost batch
    comes first, so a scored event of the lost batch closes on itself, at an offset the lost batch's write
    recorded. An offset check (the feature tables' rule) would drop that label although it was never written
    (it did on the old sink); the labels sink keeps it, and still writes the lost batch's label once."""
    m = model("ctr")
    h = Harness(m)
    sink = Labels(tmp_path, h)
    w0, s0, o1 = (h.record(*outcome("w0", "zz", T0)), h.record(*scored("s0", T0 + S)),
                  h.record(*outcome("w1", "zz", T0 + 7 * S)))
    s1, o2 = h.record(*scored("s1", T0 + 3 * S)), h.record(*outcome("w2", "zz", T0 + 60 * S))
    sink.write(h.process([w0, s0]))
    lost = h.process([o1, s1], durable=False)  # closes s0 (its window ends at T0 + 6 s); s1's is still open
    assert [lb.event_id for lb, _ in lost.labels] == ["s0"]
    sink.write(lost)  # the kill -9 comes before its state records
    sink.restart()
    sink.write(h.process([o1, o2, s1]))  # the replay, outcomes fetched first: s1 closes on itself
    assert sorted(sink.rows()) == [("s0", 0.0), ("s1", 0.0)]


def test_two_crashes_whose_replays_fetch_the_topics_in_other_orders_write_each_label_once(tmp_path: Path):
    """Run 1 fetches the outcomes first: each scored event closes its join on itself and the rows are written,
    then a kill -9 comes before any state record. Run 2 fetches the scored events first: their joins stay open,
    and that state is saved (it covers the offsets run 1's rows came from); a kill -9 comes before the
    outcomes. Run 3 closes the joins again: run 1's rows must still be found (an origin-offset range missed
    them: seen in CI as 22,411 labels written twice after three kills)."""
    m = model("ctr")
    h = Harness(m)
    sink = Labels(tmp_path, h)
    oev = [outcome(f"o{i}", f"s{i}", T0 + i * S + S) for i in (0, 2)] + [outcome("w", "zz", T0 + 60 * S)]
    sev = [scored(f"s{i}", T0 + i * S) for i in range(4)]
    outs, scs = [h.record(*e) for e in oev], [h.record(*e) for e in sev]
    sink.write(h.process(outs + scs, durable=False))  # run 1: every label written, no state saved
    assert len(sink.rows()) == 4
    sink.restart()
    assert not h.process(scs).labels  # run 2: its state is saved, the joins still open
    sink.restart()
    sink.write(h.process(outs + scs))  # run 3
    assert sorted(sink.rows()) == sorted(reference(oev + sev, m).items()) == [("s0", 1.0), ("s1", 0.0), ("s2", 1.0),
                                                                              ("s3", 0.0)]


def test_a_backlog_waits_for_its_outcomes_before_closing_by_the_scored_watermark():
    """A fresh consumer on a backlog may fetch only scored events first: while the outcome topic has records
    not consumed yet, its joins do not close by the scored topic's watermark (they would close as 0)."""
    m = model("ctr")
    h = Harness(m)
    scored_first = [h.record(*scored(f"s{i}", T0 + i * S)) for i in range(10)]
    outcomes = [h.record(*outcome(f"o{i}", f"s{i}", T0 + i * S + 2 * S)) for i in range(10)]
    waiting = h.engine.process(scored_first, h.get, now_us=T0, caught_up=lambda topic, p: False)
    h.write(waiting, lambda key: True)
    assert not waiting.labels, "closed by the scored watermark before the outcomes were read"
    out = h.engine.process(outcomes, h.get, now_us=T0, caught_up=lambda topic, p: True)
    assert {lb.event_id: lb.label for lb, _ in out.labels} == {f"s{i}": 1.0 for i in range(7)}
    unsure = Harness(m)  # the same fetch when the outcome partition is known to be empty: closes by the scored one
    out = unsure.engine.process([unsure.record(*scored(f"s{i}", T0 + i * S)) for i in range(10)], unsure.get,
                                now_us=T0, caught_up=lambda topic, p: True)
    assert {lb.event_id: lb.label for lb, _ in out.labels} == {f"s{i}": 0.0 for i in range(5)}


def test_a_label_row_is_the_record_of_the_label_contract() -> None:
    row = LabelRow("ctr", "u1", 1.0, "e" * 64, 1_767_225_600_000_001)
    want = Label(model_name="ctr", key="u1", label=1.0, event_id="e" * 64, ts=1_767_225_600_000_001)
    assert Label.from_bytes(row.to_bytes()) == want
    assert row.to_bytes() == want.to_bytes()
