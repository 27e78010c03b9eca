"""Bad input fuzzing: 10,000 generated bad payloads (hypothesis) mixed into valid event streams, on every topic
a worker consumes: the declared event topics (streams and serving), ``predictions``, ``labels``,
``models.promoted`` and ``models.rejected`` (drift) and ``retrain.requests`` (retrain). Every bad payload is
dead-lettered with a reason by the worker that reads it, no worker crashes, and the valid events' features,
labels and predictions are exact.

Bad payloads: random bytes, JSON of the wrong kind, missing fields, fields of the wrong type, NaN, strings
past the limits (some of 1 MB), event times far in the past and in the future, wrong schema versions, record
keys naming another entity, and unknown model names. (Valid control records are not mixed in: a valid retrain
request or promotion would start training or a swap; their handling is tested elsewhere.)"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftloop.app.producer import publish
from driftloop.bench.model_fixtures import register_good
from driftloop.bench.serving import audit, read_all
from driftloop.core.broker import free_port
from driftloop.core.contracts import TOPICS, now_us
from driftloop.core.kafka import make_producer
from driftloop.core.settings import Settings
from driftloop.registry.aliases import promote
from tests.helpers import apply_repo, valid, wait_progress, wait_streamed, worker
from tests.test_streams_exact import _views, ads_traffic, check_exact

pytestmark = pytest.mark.reliability

IMP, CLICK = "events.impressions", "events.clicks"
CONTRACTS = ("predictions", "labels", "models.promoted", "models.rejected", "retrain.requests")
READER = {IMP: ("streams", "serving.ctr"), CLICK: ("streams",), "predictions": ("drift",), "labels": ("drift",),
          "models.promoted": ("drift",), "models.rejected": ("drift",), "retrain.requests": ("retrain",)}
SCHEMA_ONLY = {"past", "future", "key"}  # what serving does not judge: it scores by the value's own fields
BATCH, EXAMPLES = 25, 396  # 9,900 generated, plus 100 fixed ones with 1 MB strings: 10,000
YEAR_US = 365 * 86400 * 10**6


def _impression(user: str = "u1") -> dict[str, Any]:
    return {"schema_version": 1, "event_id": uuid.uuid4().hex[:16], "ts": now_us() - 10**6, "user_id": user,
            "ad_id": "a1", "campaign_id": "c1", "device": "mobile", "country": "US", "position": 1, "bid": 1.5}


def _click(user: str = "u1") -> dict[str, Any]:
    return {"schema_version": 1, "event_id": uuid.uuid4().hex[:16], "ts": now_us() - 10**6, "user_id": user,
            "ad_id": "a1", "impression_id": "nope"}


def _contract(topic: str, model: str = "ctr") -> dict[str, Any]:
    base = {"schema_version": 1, "event_id": uuid.uuid4().hex[:16], "ts": now_us(), "model_name": model}
    return {**base, **{
        "predictions": {"key": "u1", "model_version": "1", "score": 0.5, "features": {"ad_bid": 1.0},
                        "latency_s": 0.01},
        "labels": {"key": "u1", "label": 1.0},
        "models.promoted": {"version": "1", "previous_version": None, "run_id": "r", "metrics": {},
                            "reason": "fuzz"},
        "models.rejected": {"version": "1", "run_id": "r", "checks": {"x": "y"}},
        "retrain.requests": {"reason": "manual"},
    }[topic]}


INT64 = st.integers(-(2**63), 2**63 - 1)  # JSON numbers a producer can send (orjson writes 64-bit integers)
JUNK = st.one_of(st.none(), st.booleans(), INT64, st.text(max_size=5), st.lists(INT64, max_size=2),
                 st.dictionaries(st.text(max_size=3), INT64, max_size=2))


@st.composite
def bad_payload(draw: st.DrawFn) -> tuple[str, bytes | None, bytes, str]:
    """(logical topic, key, value, kind) of one bad record."""
    topic = draw(st.sampled_from([IMP, IMP, CLICK, *CONTRACTS]))
    rec = (_impression if topic == IMP else _click)() if topic.startswith("events.") else _contract(topic)
    key = str(rec.get("user_id", rec.get("model_name"))).encode()
    kind = draw(st.sampled_from(["bytes", "not_object", "missing", "wrong_type", "nan", "long_string",
                                 "schema_version", *(("past", "future", "key") if topic.startswith("events.")
                                                     else ("unknown_model", "extra_field"))]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=64))
        return topic, key, raw if not raw.lstrip().startswith(b"{") else b"\xff" + raw, kind
    if kind == "not_object":
        return topic, key, orjson.dumps(draw(st.one_of(INT64, st.lists(INT64, max_size=3),
                                                       st.text(max_size=8), st.none()))), kind
    if kind == "nan":
        field = draw(st.sampled_from(["bid", "ts"] if topic == IMP else ["ts"]))
        return topic, key, orjson.dumps({**rec, field: 0}).replace(f'"{field}":0'.encode(), f'"{field}":NaN'
                                                                    .encode()), kind
    fields = [f for f in rec if f != "schema_version"]
    if kind == "missing":
        contract = TOPICS.get(topic, (None,))[0]
        required = [f for f in fields if contract is None or contract.model_fields[f].is_required()]
        del rec[draw(st.sampled_from(required))]
    elif kind == "wrong_type" and topic.startswith("events."):  # the event schema is strict about types
        field = draw(st.sampled_from(fields))
        rec[field] = draw(JUNK.filter(lambda v, old=rec[field]: type(v) is not type(old)
                                      and not (isinstance(old, float) and type(v) is int)))
    elif kind == "wrong_type":  # pydantic coerces "1" to 1.0: a list is no field's type
        rec[draw(st.sampled_from(fields))] = draw(st.sampled_from([[[1]], [{"a": 1}], [None, [2]]]))
    elif kind == "long_string":
        rec[draw(st.sampled_from(["event_id", "user_id"] if topic.startswith("events.") else ["event_id"]))] = \
            "x" * draw(st.integers(1025, 4000))
    elif kind == "schema_version":  # (a contract's "1" would be coerced to 1)
        rec["schema_version"] = draw(st.sampled_from([0, 2, 99, None, *(["1"] if topic.startswith("events.") else [])]))
    elif kind == "past":
        rec["ts"] = draw(st.integers(1, 10 * YEAR_US))  # the 1970s: far behind every watermark
    elif kind == "future":
        rec["ts"] = now_us() + draw(st.integers(3600, 10 * 365 * 86400)) * 10**6
    elif kind == "key":
        key = b"someone-else"
    elif kind == "unknown_model":
        rec["model_name"] = draw(st.sampled_from(["ghost", "", "CTR", "ctr "]))
        key = rec["model_name"].encode()
    elif kind == "extra_field":
        rec[draw(st.sampled_from(["extra", "unexpected"]))] = 1
    return topic, key, orjson.dumps(rec), kind


def _one_mb(i: int) -> tuple[str, bytes | None, bytes, str]:
    topic = [IMP, CLICK, "predictions", "labels", "retrain.requests"][i % 5]
    rec = (_impression if topic == IMP else _click)() if topic.startswith("events.") else _contract(topic)
    rec["event_id" if i % 2 else ("user_id" if topic.startswith("events.") else "model_name")] = "x" * 1_000_000
    return topic, b"u1", orjson.dumps(rec), "1mb_string"


class Sent:
    """The bad records as produced: (logical topic, partition, offset) → kind."""

    def __init__(self, s: Settings):
        self.s = s
        self.producer = make_producer(s, **{"message.max.bytes": 2_000_000})
        self.by_place: dict[tuple[str, int, int], str] = {}
        self.kinds: Counter[str] = Counter()
        self.scorable: set[str] = set()  # event ids of impressions only the streams worker refuses (time, key)
        self.logical = {s.topic(t): t for t in (IMP, CLICK, *CONTRACTS)}

    def send(self, items: list[tuple[str, bytes | None, bytes, str]]) -> None:
        for topic, key, value, kind in items:
            self.kinds[kind] += 1
            if topic == IMP and kind in SCHEMA_ONLY:
                self.scorable.add(orjson.loads(value)["event_id"])

            def acked(err: Any, msg: Message, kind: str = kind) -> None:
                assert err is None, err
                self.by_place[(self.logical[msg.topic()], msg.partition(), msg.offset())] = kind

            self.producer.produce(self.s.topic(topic), key=key, value=value, on_delivery=acked)
        self.producer.flush(60)


def _dead_letters(s: Settings) -> dict[tuple[str, str, int, int], str]:
    """(reader, logical topic, partition, offset) → reason, from every record on ``dlq``."""
    out = {}
    for m in read_all(s, "dlq", 10**9, timeout=0, idle_s=1):
        h = {k: v.decode() for k, v in m.headers() or ()}
        reader = h.get("consumer", "streams").removeprefix(s.topic_prefix)
        out[(reader, h["source_topic"].removeprefix(s.topic_prefix), int(h["partition"]), int(h["offset"]))] = \
            h["reason"]
    return out


def test_10000_bad_payloads_all_dead_lettered_and_the_valid_streams_exact(tmp_path: Path, bootstrap_servers: str,
                                                                        figure) -> None:
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers, partitions=2,
                 topic_prefix=f"fz{uuid.uuid4().hex[:8]}.", webhook_port=free_port())
    store, decls = apply_repo(s)
    views = _views(store)
    promote(s, make_producer(s), "ctr", register_good(s, seed=1, model="ctr"), reason="test")
    before = ads_traffic(1500, seed=31, users=200, rate=500, start_us=now_us() - 200 * 10**6)
    before = [(t, r) for t, r in before if not r["event_id"].startswith("end")]  # "after"'s closing clicks close
    after = ads_traffic(1500, seed=32, users=200, rate=500, start_us=now_us() - 100 * 10**6)  # all labels
    events = before + after
    sent = Sent(s)
    ports = {n: free_port() for n in ("streams", "serving", "drift", "retrain")}
    with worker(s.model_copy(update={"metrics_port": ports["streams"]}), "streams") as streams, \
            worker(s.model_copy(update={"metrics_port": ports["serving"]}), "serving") as serving, \
            worker(s.model_copy(update={"metrics_port": ports["drift"]}), "drift") as drift, \
            worker(s.model_copy(update={"metrics_port": ports["retrain"]}), "retrain") as retrain:
        procs = {"streams": streams, "serving": serving, "drift": drift, "retrain": retrain}
        publish(s, before)  # every partition has a watermark before the bad records come
        wait_streamed(s, before, views, alive=streams)
        chunks = iter(range(len(after)))

        @settings(max_examples=EXAMPLES, database=None, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(bad_payload(), min_size=BATCH, max_size=BATCH))
        def mixed(bad: list[tuple[str, bytes | None, bytes, str]]) -> None:
            sent.send(bad)
            good = [after[i] for i in (next(chunks, None) for _ in range(4)) if i is not None]
            if good:
                publish(s, good)

        mixed()
        sent.send([_one_mb(i) for i in range(10_000 - sum(sent.kinds.values()))])
        rest = [after[i] for i in chunks]
        if rest:
            publish(s, rest)
        want = {(reader, *place) for place, _ in sent.by_place.items() for reader in READER[place[0]]
                if not (reader.startswith("serving") and sent.by_place[place] in SCHEMA_ONLY)}
        got: dict[tuple[str, str, int, int], str] = {}

        def missing() -> int:
            got.update(_dead_letters(s))
            return len(want - set(got))

        def describe() -> str:
            gone = Counter((r, t, sent.by_place[(t, p, o)]) for r, t, p, o in want - set(got))
            return (f"{sum(gone.values())} bad records not dead-lettered (reader, topic, kind): "
                    f"{gone.most_common(12)}; workers exited: {[n for n, p in procs.items() if p.poll() is not None]}")

        wait_progress(lambda: missing() == 0, missing, 120, describe, every=2.0)
        wait_streamed(s, events, views, alive=streams)
        impressions = {r["event_id"] for r in valid(events, IMP)}
        preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", 10**9, timeout=0, idle_s=1)
                 if ("predictions", m.partition(), m.offset()) not in sent.by_place]  # the serving worker's only
        served = [p for p in preds if p["event_id"] in impressions]
        dead = {name: p.poll() for name, p in procs.items() if p.poll() is not None}
        assert not dead, f"workers exited: {dead}"
    sent.producer = None  # no reconnect attempts once the session's broker stops
    assert sum(sent.kinds.values()) == 10_000 == len(sent.by_place)
    reasons = {place[1:]: got[place] for place in want}
    assert all(reasons.values()), "a dead letter without a reason"
    check_exact(s, store, events, views, decls=decls)
    result = audit(s, impressions, served)
    assert result["lost"] == 0 and result["misversioned"] == 0, result
    scored = {p["event_id"] for p in preds}
    assert scored <= impressions | sent.scorable, f"{len(scored - impressions - sent.scorable)} invalid events scored"
    by_reason = Counter(got[w] for w in want)
    per_topic = defaultdict(int)
    for place in sent.by_place:
        per_topic[place[0]] += 1
    figure("bad input: payloads sent", len(sent.by_place), "records", **dict(per_topic))
    figure("bad input: dead-lettered with a reason", len(reasons), "dead letters", **dict(by_reason))
    figure("bad input: not dead-lettered", len(want - set(got)), "records")
    figure("bad input: worker crashes", 0, "crashes")
