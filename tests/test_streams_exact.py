"""The streams engine against the brute-force reference (tests/reference.py), through the real broker,
Delta tables and Feast online store, on the ads example (the default repo): disorder within the lateness,
late and malformed records, the click-through label join, kill -9 restarts, a view added later (with a
pandas udf), and a repo of its own with an integer entity key and a regression label."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from feast import FeatureStore

from driftloop.app.producer import publish
from driftloop.app.supervisor import Child, settings_env
from driftloop.core import delta
from driftloop.core.contracts import Label
from driftloop.core.declarations import Declarations, LabelSpec, ModelSpec, TopicSpec
from driftloop.core.settings import Settings
from driftloop.core.topics import default_topics, ensure_topics
from driftloop.core.worker import RESTART_EXIT
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import open_store
from driftloop.features.windows import ViewSpec, specs_from_feast
from tests.helpers import apply_repo, read_topic, valid, wait_for, wait_progress, wait_streamed, worker
from tests.reference import assert_frames_match, assert_labels_match, expected, expected_labels, offline_rows

START = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z: event times of the generated traffic start here
MALFORMED_EACH = 200


def _views(store: FeatureStore) -> list[ViewSpec]:
    return specs_from_feast(store.list_stream_feature_views())


def _rows(s: Settings, name: str) -> int:
    return len(delta.read(s.offline_dir / name, ["_offset"]))


def check_exact(s: Settings, store: FeatureStore, events: list[tuple[str, dict]], views: list[ViewSpec],
                transforms: dict | None = None, decls: Declarations | None = None,
                rows: Callable[[Settings, ViewSpec], pd.DataFrame] = offline_rows) -> None:
    """Offline rows (one per event, none twice; read by ``rows``) and online rows equal the reference, for
    every view; with ``decls``, the labels of every outcome-joined model too (one per scored event)."""
    for v in views:
        tf = (transforms or {}).get(v.name)
        want_off, want_on = expected(valid(events, v.topic), v, tf)
        names = [a.name for a in v.aggs]
        assert_frames_match(rows(s, v), want_off, "event_id", names)
        got = store.get_online_features(features=[f"{v.name}:{n}" for n in names],
                                        entity_rows=[{v.entity_key: e} for e in want_on[v.entity_key].tolist()])
        assert_frames_match(got.to_df(), want_on, v.entity_key, names)
    for m in (decls.models.values() if decls else ()):
        if m.label.kind == "outcome":
            assert_labels_match(s, m, expected_labels(events, m))


def ads_traffic(n: int, seed: int, **kw) -> list[tuple[str, dict]]:
    """Ad traffic, then a click per user of the first 50 a minute after the last event: no impression
    has it, but it moves the clicks' watermark of every partition past every label window."""
    events = synthetic_events(n, seed=seed, start_us=kw.pop("start_us", START), **kw)
    end = max(r["ts"] for _, r in events) + 60_000_000
    return events + [("events.clicks", {"schema_version": 1, "event_id": f"end{seed}-{u}", "ts": end + u,
                                        "user_id": f"u{u}", "impression_id": "none", "ad_id": "a0"})
                     for u in range(50)]


def _malformed(n_each: int) -> list[tuple[str, bytes, bytes]]:
    good = {"schema_version": 1, "event_id": "m", "ts": 1, "user_id": "u1", "ad_id": "a", "campaign_id": "c",
            "device": "mobile", "country": "US", "position": 1, "bid": 1.0}
    kinds = {
        "bad_json": lambda i: b'{"user_id": "u1", ' + str(i).encode(),
        "wrong_type": lambda i: orjson.dumps({**good, "event_id": f"w{i}", "bid": "a lot"}),
        "missing": lambda i: orjson.dumps({k: v for k, v in {**good, "event_id": f"x{i}"}.items() if k != "ad_id"}),
        "schema_version": lambda i: orjson.dumps({**good, "event_id": f"s{i}", "schema_version": 2}),
        "oversize": lambda i: orjson.dumps({**good, "event_id": f"o{i}", "pad": "x" * 70_000}),
    }
    return [("events.impressions", b"u1", make(i)) for make in kinds.values() for i in range(n_each)]


def test_exact_with_disorder_late_and_malformed_records(settings: Settings):
    """100k events out of order within the lateness, every function, windows of 1, 5 and 10 minutes."""
    store, decls = apply_repo(settings)
    views = _views(store)
    assert {a.function for v in views for a in v.aggs} == {"count", "sum", "mean", "min", "max"}
    events = ads_traffic(100_000, users=3000, rate=400, disorder_s=3.0, seed=11)  # ~250 s of event time
    late = [("events.impressions", {**r, "event_id": f"late{i}", "ts": r["ts"] - 3_600_000_000})
            for i, (t, r) in enumerate(events[20_000:20_050]) if t == "events.impressions"]
    bad = _malformed(MALFORMED_EACH)
    rng = random.Random(5)
    stream: list = list(events)
    for item in bad:
        stream.insert(rng.randrange(1000, len(stream)), item)
    stream[40_000:40_000] = late
    with worker(settings, "streams"):
        publish(settings, stream)
        wait_streamed(settings, events, views, 240)
    check_exact(settings, store, events, views, decls=decls)

    dlq = read_topic(settings, "dlq", len(bad) + len(late), timeout=60)
    reasons = pd.Series([dict(m.headers())["reason"].decode() for m in dlq]).value_counts().to_dict()
    assert reasons == {"bad_json": MALFORMED_EACH, "invalid": 2 * MALFORMED_EACH, "schema_version": MALFORMED_EACH,
                       "oversize": MALFORMED_EACH, "late": len(late)}
    assert all(dict(m.headers())["error"] for m in dlq)


def test_exact_after_three_kill9_restarts(settings: Settings):
    """100k events published before the worker starts (a backlog: its first fetches can hold scored records of a
    partition whose outcomes are not fetched yet); SIGKILL at 3 random points (10-85% of the rows written) and
    restart: nothing lost, nothing counted twice (features and labels), and the last worker (still alive)
    commits every partition to its end."""
    store, decls = apply_repo(settings)
    views = _views(store)
    events = ads_traffic(100_000, users=3000, rate=1000, disorder_s=3.0, seed=12)
    total = len(events)
    rng = random.Random(7)
    kill_at = sorted(rng.uniform(0.1, 0.85) * total for _ in range(3))
    child = Child("streams", settings_env(settings), settings.root / "streams.log")

    def start() -> None:
        (settings.run_dir / "streams.ready").unlink(missing_ok=True)
        child.start()
        wait_for(lambda: (settings.run_dir / "streams.ready").exists(), 90)

    def rows() -> int:
        return _rows(settings, "bronze_impressions") + _rows(settings, "bronze_clicks")

    publish(settings, events)
    start()
    try:
        for i, threshold in enumerate(kill_at):
            wait_progress(lambda t=threshold: rows() >= t, rows, 90, lambda t=threshold: f"{rows()} of {t:.0f} rows",
                          every=0.2, alive=child.proc)
            time.sleep(rng.uniform(0.0, 1.5))
            child.signal_group(signal.SIGKILL)
            child.proc.wait()
            assert child.proc.returncode == -signal.SIGKILL, f"kill {i} did not land"
            start()
        wait_streamed(settings, events, views, alive=child.proc)
        assert child.proc.poll() is None, f"the worker died: see {settings.root / 'streams.log'}"
    finally:
        child.stop()
    check_exact(settings, store, events, views, decls=decls)


def test_a_state_record_over_one_megabyte_is_saved_and_recovered(settings: Settings):
    """Outcomes read long before their scored events (a backlog of one topic) wait in their entity's state
    record: 7,000 clicks of one user make it a few MB, over Kafka's usual 1 MB. The worker saves it, a kill -9
    and restart recover it from the changelog, and the impressions published afterwards get their labels."""
    store, decls = apply_repo(settings)
    views = _views(store)
    good = {"schema_version": 1, "user_id": "u1", "ad_id": "a1", "campaign_id": "c1", "device": "mobile",
            "country": "US", "position": 1, "bid": 1.0}
    impressions = [("events.impressions", {**good, "event_id": f"imp-{i:05d}", "ts": START + i * 1000})
                   for i in range(7000)]
    clicks = [("events.clicks", {"schema_version": 1, "event_id": f"clk-{i:05d}", "ts": r["ts"] + 1_000_000,
                                 "user_id": "u1", "impression_id": r["event_id"], "ad_id": "a1"})
              for i, (_t, r) in enumerate(impressions)]
    end = START + 120_000_000  # moves the clicks' watermark past every window (as ads_traffic's last clicks)
    clicks += [("events.clicks", {"schema_version": 1, "event_id": f"end-{u}", "ts": end + u, "user_id": f"u{u}",
                                  "impression_id": "none", "ad_id": "a0"}) for u in range(50)]
    child = Child("streams", settings_env(settings), settings.root / "streams.log")

    def start() -> None:
        (settings.run_dir / "streams.ready").unlink(missing_ok=True)
        child.start()
        wait_for(lambda: (settings.run_dir / "streams.ready").exists(), 90)

    publish(settings, clicks)
    start()
    try:
        wait_streamed(settings, clicks, views, alive=child.proc)
        child.signal_group(signal.SIGKILL)
        child.proc.wait()
        start()
        publish(settings, impressions)
        wait_streamed(settings, clicks + impressions, views, alive=child.proc)
        assert child.proc.poll() is None, f"the worker died: see {settings.root / 'streams.log'}"
    finally:
        child.stop()
    log = (settings.root / "streams.log").read_text()
    assert "state of user_id=u1 is" in log, "the record did not pass 1 MB: the test proves nothing"
    check_exact(settings, store, clicks + impressions, views, decls=decls)
    labels = delta.read(settings.offline_dir / "labels")
    assert len(labels) == 7000 and labels["label"].eq(1.0).all()


NEW_VIEW = '''
from datetime import timedelta

from feast import Field, StreamFeatureView
from feast.aggregation import Aggregation
from feast.types import Float64, Int64, String

from driftloop.core.declarations import event_source

from ads import IMPRESSION, user


def top_slots_in_eur(df):
    """Keep the top three positions and convert the bid."""
    df = df[df["position"] <= 3].copy()
    df["bid_eur"] = df["bid"] * 0.92
    return df


user_top_bids_eur = StreamFeatureView(
    name="user_top_bids_eur",
    entities=[user],
    ttl=timedelta(hours=1),
    source=event_source("events.impressions", IMPRESSION, "user_top_bids_eur"),
    mode="pandas",
    udf=top_slots_in_eur,
    timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="bid_eur", function="sum", time_window=timedelta(seconds=30),
                    slide_interval=timedelta(seconds=5), name="top_bid_eur_30s"),
        Aggregation(column="bid_eur", function="count", time_window=timedelta(minutes=2),
                    slide_interval=timedelta(seconds=10), name="top_n_2m"),
    ],
    schema=[Field(name="user_id", dtype=String), Field(name="top_bid_eur_30s", dtype=Float64),
            Field(name="top_n_2m", dtype=Int64)],
    online=True,
)
'''


def _top_slots_in_eur(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["position"] <= 3].copy()
    df["bid_eur"] = df["bid"] * 0.92
    return df


def test_new_view_file_apply_and_restart(settings: Settings):
    """A view added to the repo (with a pandas udf) + `driftloop apply` while the worker runs: it exits to be
    restarted (RESTART_EXIT), seeds the new view from the topic's bronze rows and continues it: the view is
    exact over every event, before and after it was added."""
    store, _decls = apply_repo(settings)
    before = synthetic_events(6000, users=300, rate=200, disorder_s=2.0, seed=21, start_us=START)
    with worker(settings, "streams") as proc:
        publish(settings, before)
        wait_streamed(settings, before, _views(store), 120)
        (settings.feature_repo_dir / "top_bids.py").write_text(NEW_VIEW)
        store, _decls = apply_repo(settings)
        wait_for(lambda: proc.poll() is not None, 60)
        assert proc.returncode == RESTART_EXIT
    views = _views(store)
    new = next(v for v in views if v.name == "user_top_bids_eur")
    assert new.udf is not None and new.mode == "pandas"
    start = max(r["ts"] for _, r in before) + 1_000_000
    after = synthetic_events(6000, users=300, rate=200, disorder_s=2.0, seed=22, start_us=start)
    with worker(settings, "streams"):
        publish(settings, after)
        wait_streamed(settings, before + after, views, 120)
        n_new = len(_top_slots_in_eur(pd.DataFrame(valid(before + after, "events.impressions"))))
        wait_for(lambda: _rows(settings, new.name) >= n_new, 60)
    store = open_store(settings)
    # the new view starts where the data starts: seeded from the bronze rows of the events before it existed
    check_exact(settings, store, before + after, [new], {new.name: _top_slots_in_eur})
    check_exact(settings, store, before + after, [v for v in views if v.name == "user_impressions"])


COURIERS = '''
"""Couriers (integer entity key): trip events scored for a delivery-time model, labelled by deliveries."""
from datetime import timedelta

from feast import Entity, FeatureService, Field, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.types import Float64, Int64

from driftloop.core.declarations import Model, OutcomeLabel, event_source

TRIP = "courier_id int, distance double"
DELIVERED = "courier_id int, trip_id string, minutes double"

courier = Entity(name="courier", join_keys=["courier_id"], value_type=ValueType.INT64)
trips = event_source("events.trips", TRIP)
delivered = event_source("events.delivered", DELIVERED)

courier_trips = StreamFeatureView(
    name="courier_trips", entities=[courier], ttl=timedelta(hours=1),
    source=event_source("events.trips", TRIP, "courier_trips"), timestamp_field="event_timestamp",
    aggregations=[
        Aggregation(column="distance", function="sum", time_window=timedelta(seconds=30),
                    slide_interval=timedelta(seconds=5), name="distance_30s"),
        Aggregation(column="distance", function="count", time_window=timedelta(minutes=1),
                    slide_interval=timedelta(seconds=10), name="trips_1m"),
    ],
    schema=[Field(name="courier_id", dtype=Int64), Field(name="distance_30s", dtype=Float64),
            Field(name="trips_1m", dtype=Int64)],
    online=True,
)

eta_v1 = FeatureService(name="eta_v1", features=[courier_trips])

eta = Model(name="eta", task="regression", metric="rmse", source=trips, features=eta_v1,
            label=OutcomeLabel(source=delivered, join_on="trip_id", window=timedelta(seconds=30),
                               value_field="minutes"))
'''


def _courier_traffic(n: int, couriers: int = 40, seed: int = 3) -> list[tuple[str, dict]]:
    """Trips (event time up to 2 s behind send time) and, for most, a delivery 1-25 s or 40-50 s (outside
    the 30 s window) later; then a delivery per courier a minute after the rest (moves every watermark)."""
    r = np.random.default_rng(seed)
    out: list[tuple[int, str, dict]] = []
    for i in range(n):
        send = START + i * 20_000  # 50 trips/s
        cid = 1000 + int(r.integers(couriers))
        ts = send - int(r.uniform(0, 2) * 1e6)
        out.append((send, "events.trips", {"schema_version": 1, "event_id": f"t{i}", "ts": ts, "courier_id": cid,
                                           "distance": round(float(r.uniform(0.5, 9)), 3)}))
        if r.random() < 0.7:
            delay = float(r.uniform(1, 25) if r.random() < 0.85 else r.uniform(40, 50))
            at = ts + int(delay * 1e6)
            out.append((at, "events.delivered", {"schema_version": 1, "event_id": f"d{i}", "ts": at,
                                                 "courier_id": cid, "trip_id": f"t{i}",
                                                 "minutes": round(float(r.uniform(5, 60)), 2)}))
    end = max(x[0] for x in out) + 60_000_000
    out += [(end, "events.delivered", {"schema_version": 1, "event_id": f"end{c}", "ts": end, "courier_id": c,
                                       "trip_id": "none", "minutes": 0.0}) for c in range(1000, 1000 + couriers)]
    out.sort(key=lambda x: x[0])
    return [(t, rec) for _, t, rec in out]


def test_integer_entity_key_and_regression_label(settings: Settings, tmp_path: Path):
    """A repo of its own keyed by ``courier_id int``: online rows are found by integer keys, offline rows and
    the labels (the delivery's minutes, if within 30 s of the trip) equal the reference."""
    repo = tmp_path / "couriers_repo"
    repo.mkdir()
    (repo / "couriers.py").write_text(COURIERS)
    s = Settings(data_dir=settings.data_dir, bootstrap_servers=settings.bootstrap_servers,
                 topic_prefix=settings.topic_prefix, partitions=settings.partitions, repo=repo)
    store, decls = apply_repo(s)
    assert decls.topics["events.trips"].key_type == "int" and decls.models["eta"].key_type == "int"
    views = _views(store)
    assert [(v.name, v.key_type) for v in views] == [("courier_trips", "int")]
    events = _courier_traffic(3000)
    with worker(s, "streams"):
        publish(s, events, rate=1500)  # a few seconds: many batches
        wait_streamed(s, events, views, 180)
    check_exact(s, store, events, views, decls=decls)
    got = store.get_online_features(features=["courier_trips:trips_1m"], entity_rows=[{"courier_id": 1000}])
    assert got.to_dict()["trips_1m"][0] > 0
    labels = delta.read(s.offline_dir / "labels")
    want = expected_labels(events, decls.models["eta"])
    assert 0 < len(labels) == len(want) < len(valid(events, "events.trips"))
    msgs = read_topic(s, "labels", len(want), timeout=60)
    assert len(msgs) == len(want)
    sample = Label.from_bytes(msgs[0].value())
    assert sample.model_name == "eta" and msgs[0].key() == sample.key.encode() and int(sample.key) >= 1000
    dead = read_topic(s, "dlq", 1000, timeout=5)
    assert {dict(m.headers())["reason"].decode() for m in dead} <= {"late_outcome"}
    late = {orjson.loads(m.value())["trip_id"] for m in dead}
    trips = {r["event_id"]: r["ts"] for r in valid(events, "events.trips")}
    outcome_ts = {r["trip_id"]: r["ts"] for r in valid(events, "events.delivered")}
    assert all(outcome_ts[t] - trips[t] > 30e6 for t in late), "only deliveries outside the window come late"


def test_label_topic_partition_counts_must_match(settings: Settings):
    """A label join needs the outcome topic partitioned like the scored one: ensure_topics refuses otherwise."""
    m = ModelSpec(name="eta", task="regression", metric="rmse", higher_is_better=False, topic="events.trips",
                  key="courier_id", feature_service="eta_v1", features=["x"],
                  label=LabelSpec(kind="outcome", topic="events.delivered", id_field="trip_id", value_field="minutes"))
    topics = {t: TopicSpec(name=t, key="courier_id", key_type="int", fields={"courier_id": "int", "trip_id": "string",
                                                                            "minutes": "double"})
              for t in (m.topic, m.label.topic)}
    Declarations(topics=topics, models={"eta": m}).save(settings.declarations_file)
    wider = settings.model_copy(update={"partitions": settings.partitions + 1})
    ensure_topics(wider, ["events.delivered"])
    with pytest.raises(ValueError, match=f"{settings.topic('events.delivered')} has 3 partitions.*"
                                         f"{settings.topic('events.trips')} has 2"):
        ensure_topics(settings)
    assert set(default_topics(settings)) >= {"events.trips", "events.delivered", "labels", "dlq"}
