"""Spark backfill and measured consistency on a real stream: the stream's offline rows and online values
equal the Spark (embedded pysail, Spark Connect) recompute from bronze; a backfill reproduces them; a
corrupted or lost row is found and repaired; and the plain ``feast`` CLI works on the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from deltalake import DeltaTable

from driftloop.app.producer import publish
from driftloop.core import delta
from driftloop.core.broker import EmbeddedBroker
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.backfill import backfill
from driftloop.features.consistency import consistency
from driftloop.features.repo import apply
from driftloop.features.windows import specs_from_feast
from tests.helpers import valid, wait_streamed, worker
from tests.reference import assert_frames_match, expected, offline_rows

VIEWS = ["user_impressions", "user_clicks", "user_bid_stats"]


@pytest.fixture(scope="module")
def broker() -> Iterator[str]:
    """A broker of this module's own: its 36k events do not stay in the session broker's memory."""
    if os.environ.get("DRIFTLOOP_TEST_BOOTSTRAP"):
        yield os.environ["DRIFTLOOP_TEST_BOOTSTRAP"]
        return
    with EmbeddedBroker() as b:
        yield b.bootstrap_servers


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, broker: str) -> Iterator[tuple[Settings, list]]:
    """30k impressions (+ clicks) out of order within the lateness, plus late ones, through the streams worker."""
    s = Settings(data_dir=tmp_path_factory.mktemp("backfill"), bootstrap_servers=broker,
                 topic_prefix=f"bf{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(s)
    store = apply(s)[0]
    views = specs_from_feast(store.list_stream_feature_views())
    start = time.time_ns() // 1000 - 200_000_000  # ~100 s of event time, ending in the past (max_future_s)
    events = synthetic_events(30_000, users=800, rate=300, disorder_s=3.0, seed=21, start_us=start)
    late = [("events.impressions", {**r, "event_id": f"late{i}", "ts": r["ts"] - 3_600_000_000})
            for i, (t, r) in enumerate(events[5_000:5_040]) if t == "events.impressions"]
    with worker(s, "streams"):
        publish(s, events[:15_000] + late + events[15_000:])
        wait_streamed(s, events, views, 240)
    yield s, events


def _shares(rows) -> dict[tuple[str, str, str], tuple[int, int]]:
    return {(r.view, r.feature, r.check): (r.rows, r.mismatched) for r in rows}


def test_consistency_is_zero_on_generated_data(streamed):
    s, events = streamed
    rows = consistency(s)
    got = _shares(rows)
    assert {v for v, _f, _c in got} == set(VIEWS)
    n_imp, n_clk = len(valid(events, "events.impressions")), len(valid(events, "events.clicks"))
    users = len({r["user_id"] for r in valid(events, "events.impressions")})
    assert got[("user_impressions", "impressions_1m", "offline")] == (n_imp, 0)
    assert got[("user_clicks", "clicks_5m", "offline")] == (n_clk, 0)
    assert got[("user_bid_stats", "bid_max_10m", "online")] == (users, 0)
    assert all(m == 0 for _n, m in got.values()), {k: v for k, v in got.items() if v[1]}
    prom = (s.root / "metrics" / "consistency.prom").read_text()
    assert 'driftloop_consistency_mismatch_share{check="online",feature="mean_bid_1m",view="user_impressions"} 0.0' \
        in prom


def test_backfill_reproduces_the_stream_and_repairs_it(streamed):
    s, events = streamed
    table = s.offline_dir / "user_impressions"
    imps = valid(events, "events.impressions")
    ts = sorted(r["ts"] for r in imps)
    start = datetime.fromtimestamp(ts[len(ts) // 3] / 1e6, UTC)
    end = datetime.fromtimestamp(ts[2 * len(ts) // 3] / 1e6, UTC)
    # damage the stream's rows: one wrong value inside the range, one row lost
    dt = DeltaTable(str(table))
    rows = delta.read(table)
    inside = rows[(rows["event_timestamp"] >= start) & (rows["event_timestamp"] < end)]
    a, b = inside.iloc[10], inside.iloc[20]
    dt.update(predicate=f"_partition = {a._partition} AND _offset = {a._offset}", updates={"impressions_1m": "999"})
    DeltaTable(str(table)).delete(f"_partition = {b._partition} AND _offset = {b._offset}")
    found = _shares(consistency(s, ["user_impressions"], online=False))
    assert found[("user_impressions", "impressions_1m", "offline")][1] == 2  # the wrong value + the lost row
    assert found[("user_impressions", "mean_bid_1m", "offline")][1] == 1  # only the lost row

    r = backfill(s, "user_impressions", start, end)
    n_in = sum(1 for x in imps if start.timestamp() * 1e6 <= x["ts"] < end.timestamp() * 1e6)
    assert r["rows"] == n_in and r["written"]
    view = specs_from_feast([apply(s)[0].get_stream_feature_view("user_impressions")])[0]
    want, _ = expected(imps, view)
    assert_frames_match(offline_rows(s, view), want, "event_id", [a.name for a in view.aggs])
    assert all(m == 0 for _n, m in _shares(consistency(s, ["user_impressions"], online=False)).values())
    again = backfill(s, "user_impressions", start, end, materialize=True)  # idempotent
    assert again["rows"] == r["rows"] and len(delta.read(table, ["_offset"])) == len(imps)
    # materializing an old range never moves an online value back: online still equals the stream's
    assert again["materialized"]
    assert all(m == 0 for _n, m in _shares(consistency(s, ["user_impressions"])).values())


def test_backfill_rejects_bad_input(streamed):
    s, _ = streamed
    t = datetime.now(UTC)
    with pytest.raises(ValueError, match="no stream feature view 'nope'"):
        backfill(s, "nope", t, t + timedelta(hours=1))
    with pytest.raises(ValueError, match="must be after"):
        backfill(s, "user_clicks", t, t - timedelta(hours=1))
    cli = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "--data-dir", str(s.data_dir), "backfill",
                          "--view", "user_clicks", "--start", "yesterday", "--end", "now"],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "not an ISO 8601 time" in cli.stderr


@pytest.mark.slow  # ~60 s of Feast CLI subprocesses; the materialization guarantee itself is in test_online_stores
def test_plain_feast_cli_on_the_repo(streamed):
    """`feast apply`, `feast (stream-)feature-views list`, `feast materialize-incremental` on the example repo."""
    s, events = streamed
    feast = Path(sys.executable).parent / "feast"
    repo = str(s.feature_repo_dir)

    def run(*args: str) -> str:
        p = subprocess.run([str(feast), "-c", repo, *args], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    run("apply")
    run("feature-views", "list")  # Feast lists batch and on-demand views here, stream views below
    listed = run("stream-feature-views", "list")
    assert all(v in listed for v in VIEWS), listed
    end = datetime.fromtimestamp(max(r["ts"] for _t, r in events) / 1e6 + 1, UTC)
    run("materialize-incremental", end.strftime("%Y-%m-%dT%H:%M:%S"))
    # online still holds the stream's values (materialization never replaces a fresher or equal-time value)
    from feast import FeatureStore

    store = FeatureStore(repo_path=repo)
    view = specs_from_feast([store.get_stream_feature_view("user_clicks")])[0]
    _off, want = expected(valid(events, view.topic), view)
    got = store.get_online_features(features=["user_clicks:clicks_5m"],
                                    entity_rows=[{"user_id": u} for u in want["user_id"]]).to_df()
    assert_frames_match(got, want, "user_id", ["clicks_5m"])
