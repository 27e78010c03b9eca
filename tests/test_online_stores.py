"""driftloop's Feast online stores (``features/online_stores.py``): one conformance suite run on sqlite and on
Redis (skipped, saying why, without redis-server), checked against pandas expectations — round trip through
Feast's own API, the monotonic ``(event_ts, created_ts)`` rule (also under concurrent writers), batched
multi-view reads with missing entities, update/teardown. Then the issue's case: a store holding the stream's
fresher values, plain ``feast materialize-incremental`` over an offline table of older rows leaves them as
they are (and fills only entities the online store lacks or holds older)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.data_format import DeltaFormat
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.types import Bool, Float64, Int64, String
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from driftloop.core.delta import TS
from driftloop.core.settings import Settings
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.online_stores import MonotonicOnlineStore, key_bytes
from driftloop.features.online_write import OnlineSink
from driftloop.features.repo import apply
from driftloop.features.windows import specs_from_feast
from tests.helpers import valid
from tests.reference import expected
from tests.servers import redis_server

SQLITE = "driftloop.features.online_stores.MonotonicSqliteOnlineStore"
REDIS = "driftloop.features.online_stores.MonotonicRedisOnlineStore"
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


class Repo:
    """A small Feast repo on one of the stores: entity ``user``, views ``fa`` (x, n, s, b) and ``fb`` (y)."""

    def __init__(self, root: Path, section: str):
        self.project = f"p{uuid.uuid4().hex[:8]}"  # the Redis server is shared by the module's tests
        (root / "feature_store.yaml").write_text(
            f"project: {self.project}\nprovider: local\nregistry: {root}/registry.db\n{section}"
            f"offline_store:\n  type: driftloop.features.delta_offline_store.DeltaOfflineStore\n  root: {root}\n"
            "batch_engine:\n  type: driftloop.features.materialize.PrecomputedRowsEngine\n"
            "entity_key_serialization_version: 3\n")
        self.root = root
        user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)

        def view(name: str, fields: list[Field]) -> FeatureView:
            src = FileSource(name=f"{name}_src", path=name, file_format=DeltaFormat(),
                             timestamp_field="event_timestamp", created_timestamp_column="created")
            return FeatureView(name=name, entities=[user], ttl=timedelta(days=1), online=True, source=src,
                               schema=[Field(name="user_id", dtype=String), *fields])

        self.fa = view("fa", [Field(name="x", dtype=Float64), Field(name="n", dtype=Int64),
                              Field(name="s", dtype=String), Field(name="b", dtype=Bool)])
        self.fb = view("fb", [Field(name="y", dtype=Float64)])
        self.store = FeatureStore(repo_path=str(root))
        self.store.apply([user, self.fa, self.fb])
        self.config = self.store.config
        self.online = get_online_store_from_config(self.config.online_store)
        assert isinstance(self.online, MonotonicOnlineStore)

    def rows(self, users: list[str], x: list[float], ts: list[datetime], created: list[datetime | None]) -> list:
        """Feast online rows of ``fa`` built by hand (n = round(x), s = "v<x>", b = x > 0)."""
        return [(EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]),
                 {"x": Value(double_val=v), "n": Value(int64_val=round(v)), "s": Value(string_val=f"v{v}"),
                  "b": Value(bool_val=v > 0)}, t, c) for u, v, t, c in zip(users, x, ts, created, strict=True)]

    def features(self, refs: list[str], users: list[str]) -> pd.DataFrame:
        return self.store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in users]).to_df()


@pytest.fixture(params=["sqlite", "redis"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repo:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return Repo(tmp_path, f'online_store:\n  type: {REDIS}\n  connection_string: "{url}"\n')
    return Repo(tmp_path, f"online_store:\n  type: {SQLITE}\n  path: {tmp_path}/online.db\n")


def test_round_trip_through_feast(repo: Repo):
    rng = np.random.default_rng(1)
    users = [f"u{i}" for i in range(40)]
    ts = [T0 + timedelta(seconds=int(s)) for s in rng.integers(0, 3600, len(users))]
    df = pd.DataFrame({"user_id": users, "x": rng.normal(size=len(users)), "n": rng.integers(-5, 5, len(users)),
                       "s": [f"s{i}" for i in range(len(users))], "b": rng.random(len(users)) > 0.5,
                       "event_timestamp": ts, "created": ts})
    df.loc[3, "x"] = np.nan  # a null value
    repo.store.write_to_online_store("fa", df)  # Feast's public write path
    got = repo.features(["fa:x", "fa:n", "fa:s", "fa:b"], [*users, "nobody"])
    want = df.set_index("user_id").reindex([*users, "nobody"])
    assert np.allclose(got["x"].to_numpy(float), want["x"].to_numpy(float), equal_nan=True)
    assert got["n"].tolist()[:-1] == want["n"].tolist()[:-1] and pd.isna(got["n"].iloc[-1])
    assert got["s"].tolist()[:-1] == want["s"].tolist()[:-1] and got["b"].tolist()[:-1] == want["b"].tolist()[:-1]
    keys = [EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]) for u in ["u5", "nobody"]]
    (t5, v5), (tn, vn) = repo.online.online_read(repo.config, repo.fa, keys, ["x", "s"])
    assert t5 == ts[5] and set(v5) == {"x", "s"} and v5["s"].string_val == "s5" and (tn, vn) == (None, None)


def test_monotonic_rule(repo: Repo):
    """Older never replaces; the same instant replaces with a newer or equal created, not an older one; a row
    without a created time loses the tie to one with it; in one batch the newest row of an entity wins."""
    t, c = T0, T0 + timedelta(seconds=1)
    cases = {  # user: (stored ts, created, then written ts, created, replaced?)
        "older": (t, c, t - timedelta(seconds=1), c + timedelta(days=1), False),
        "newer": (t, c, t + timedelta(seconds=1), None, True),
        "late correction": (t, c, t, c + timedelta(seconds=1), True),
        "older created": (t, c, t, c - timedelta(seconds=1), False),
        "equal": (t, c, t, c, True),
        "backfill tie": (t, c, t, None, False),
        "backfill over backfill": (t, None, t, None, True),
    }
    users = list(cases)
    first = repo.rows(users, [1.0] * len(users), [v[0] for v in cases.values()], [v[1] for v in cases.values()])
    assert repo.online.write(repo.config, repo.fa, first) == list(range(len(users)))
    second = repo.rows(users, [2.0] * len(users), [v[2] for v in cases.values()], [v[3] for v in cases.values()])
    stored = repo.online.write(repo.config, repo.fa, second)
    assert [users[i] for i in stored] == [u for u, v in cases.items() if v[4]]
    got = repo.features(["fa:x"], users)["x"].tolist()
    assert got == [2.0 if v[4] else 1.0 for v in cases.values()]
    # several rows of one entity in a batch: the newest is stored whatever the order
    batch = repo.rows(["dup"] * 3, [5.0, 7.0, 6.0], [t, t + timedelta(seconds=2), t + timedelta(seconds=1)], [c] * 3)
    assert repo.online.write(repo.config, repo.fa, batch) == [1]
    assert repo.features(["fa:x"], ["dup"])["x"].tolist() == [7.0]


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 3))),
                         min_size=1, max_size=6), min_size=1, max_size=5))
def test_monotonic_rule_matches_pandas(repo: Repo, batches: list[list[tuple[str, int, int | None]]]):
    """Random batches of writes: each entity ends with the value of its greatest (event, created) write,
    ties going to the last written (pandas sort, independent of the store)."""
    tag = uuid.uuid4().hex[:6]
    log = []
    for batch in batches:
        users = [f"{tag}{u}" for u, _t, _c in batch]
        xs = [float(len(log) + i) for i in range(len(batch))]
        log += [(u, x, t, -1 if c is None else c) for u, x, (_u, t, c) in zip(users, xs, batch, strict=True)]
        repo.online.write(repo.config, repo.fa, repo.rows(
            users, xs, [T0 + timedelta(seconds=t) for _u, t, _c in batch],
            [None if c is None else T0 + timedelta(seconds=c) for _u, _t, c in batch]))
    df = pd.DataFrame(log, columns=["user", "x", "t", "c"]).reset_index()
    want = df.sort_values(["t", "c", "index"]).groupby("user").tail(1).set_index("user")["x"]
    got = repo.features(["fa:x"], list(want.index))["x"]
    assert got.tolist() == want.tolist()


def test_concurrent_writers_never_move_back(repo: Repo):
    """One writer writes newer rows while another writes older ones for the same entities: the newer win."""
    users = [f"c{i}" for i in range(30)]

    def writer(seconds: int, x: float) -> None:
        for _ in range(40):
            repo.online.write(repo.config, repo.fa, repo.rows(users, [x] * len(users),
                                                               [T0 + timedelta(seconds=seconds)] * len(users),
                                                               [T0] * len(users)))

    threads = [threading.Thread(target=writer, args=a) for a in ((2, 2.0), (1, 1.0))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert repo.features(["fa:x"], users)["x"].tolist() == [2.0] * len(users)


def test_read_matrix_many_views_and_missing_entities(repo: Repo):
    rng = np.random.default_rng(2)
    users = [f"u{i}" for i in range(300)]
    a = pd.DataFrame({"user_id": users[:200], "x": rng.normal(size=200), "n": rng.integers(0, 9, 200),
                      "s": "s", "b": rng.random(200) > 0.5, "event_timestamp": T0, "created": T0})
    b = pd.DataFrame({"user_id": users[100:250], "y": rng.normal(size=150), "event_timestamp": T0, "created": T0})
    repo.store.write_to_online_store("fa", a)
    repo.store.write_to_online_store("fb", b)
    newer = pd.DataFrame({"user_id": users[:200:7], "x": rng.normal(size=29)})  # rows of fa with other names (as
    repo.online.write(repo.config, repo.fa, [  # a view's features before a change): x only
        (EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]), {"x": Value(double_val=v)},
         T0 + timedelta(seconds=1), T0) for u, v in zip(newer.user_id, newer.x, strict=True)])
    a = a.set_index("user_id")
    a.loc[newer.user_id, ["n", "b"]] = np.nan
    a.loc[newer.user_id, "x"] = newer.x.to_numpy()
    a = a.reset_index()
    asked = [*users[::-1], "nobody"]  # every user, in another order, and one never written
    keys = [key_bytes(repo.config, EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=u)]))
            for u in asked]
    got = repo.online.read_matrix(repo.config, [(repo.fa, ["n", "x", "s", "b"]), (repo.fb, ["y"])], keys)
    want = pd.DataFrame({"user_id": asked}).merge(a, how="left").merge(b[["user_id", "y"]], how="left")
    assert got.shape == (len(asked), 5) and np.isnan(got[:, 2]).all()  # a string reads as missing
    for j, c in [(0, "n"), (1, "x"), (3, "b"), (4, "y")]:
        assert np.array_equal(got[:, j], want[c].to_numpy(float), equal_nan=True), c
    assert repo.online.read_matrix(repo.config, [(repo.fa, ["x"])], []).shape == (0, 1)


def test_update_and_teardown(repo: Repo):
    df = pd.DataFrame({"user_id": ["u1", "u2"], "x": [1.0, 2.0], "n": [1, 2], "s": "s", "b": True,
                       "y": [3.0, 4.0], "event_timestamp": T0, "created": T0})
    repo.store.write_to_online_store("fa", df.drop(columns="y"))
    repo.store.write_to_online_store("fb", df[["user_id", "y", "event_timestamp", "created"]])
    repo.online.update(repo.config, tables_to_delete=[repo.fb], tables_to_keep=[repo.fa], entities_to_delete=[],
                       entities_to_keep=[], partial=False)
    got = repo.features(["fa:x", "fb:y"], ["u1", "u2"])
    assert got["x"].tolist() == [1.0, 2.0] and got["y"].isna().all()
    repo.online.teardown(repo.config, [repo.fa, repo.fb], [])
    assert repo.features(["fa:x"], ["u1", "u2"])["x"].isna().all()
    repo.store.write_to_online_store("fa", df.drop(columns="y"))  # usable again after a teardown
    assert repo.features(["fa:x"], ["u1"])["x"].tolist() == [1.0]


def test_materialize_writes_newest_rows_but_never_over_newer_values(repo: Repo):
    """``store.materialize`` through ``PrecomputedRowsEngine``: per entity the offline row with the greatest
    (event, created) in the range, unless the online store holds a newer row."""
    rng = np.random.default_rng(4)
    n = 400
    ts = T0 + pd.to_timedelta(rng.integers(0, 120, n), unit="min")  # ties on the event time
    df = pd.DataFrame({"user_id": [f"u{i}" for i in rng.integers(0, 50, n)], "x": rng.normal(size=n),
                       "n": rng.integers(0, 100, n), "s": "s", "b": True, "event_timestamp": ts,
                       "created": ts + pd.to_timedelta(rng.integers(0, 600, n), unit="s")})
    for c in ("event_timestamp", "created"):
        df[c] = pd.to_datetime(df[c], utc=True).astype("datetime64[us, UTC]")
    write_deltalake(str(repo.root / "fa"), pa.Table.from_pandas(df, preserve_index=False))
    end = T0 + timedelta(minutes=100)
    newest = df[df["event_timestamp"] <= end].sort_values(["event_timestamp", "created"]).groupby("user_id").tail(1)
    newest = newest.set_index("user_id")
    ahead = list(newest.index[:5])  # the online store already holds newer values of these
    repo.online.write(repo.config, repo.fa, repo.rows(ahead, [-1.0] * 5, [end + timedelta(hours=1)] * 5, [None] * 5))
    repo.store.materialize(start_date=T0 - timedelta(hours=1), end_date=end, feature_views=["fa"])
    users = sorted(df["user_id"].unique())
    want = newest["x"].reindex(users)
    want[ahead] = -1.0
    got = repo.features(["fa:x"], users)["x"].to_numpy(float)
    assert np.array_equal(got, want.to_numpy(float), equal_nan=True)


def test_materialize_incremental_never_replaces_fresher_values(tmp_path: Path):
    """The issue's case. The online store holds the stream's values (each user's value at its newest event,
    over every event consumed); the view's Delta table holds one row per event, whose newest row by event
    time can miss events consumed after it. Plain ``feast materialize-incremental`` (the CLI) must leave the
    stream's values, and fill only users the online store lacks or holds an older value of."""
    s = Settings(data_dir=tmp_path / "data")
    store, _plan, _decls = apply(s)
    view = next(v for v in specs_from_feast(store.list_stream_feature_views()) if v.name == "user_clicks")
    start_us = int((time.time() - 600) * 1e6)
    clicks = valid(synthetic_events(4000, users=80, rate=400, disorder_s=3.0, seed=7, start_us=start_us),
                   view.topic)
    off, on = expected(clicks, view)
    # the view's offline rows as the stream appends them: created = the batch's time + the row's index
    c0 = int(time.time() * 1e6)
    rows = pd.DataFrame(clicks)[["event_id", "user_id", "ts"]].merge(off, on="event_id")
    table = pa.table({"user_id": rows["user_id"], "clicks_5m": rows["clicks_5m"].astype("int64"),
                      "event_timestamp": pa.array(rows["ts"], pa.int64()).cast(pa.timestamp("us")).cast(TS),
                      "created": pa.array(c0 + np.arange(len(rows)), pa.int64()).cast(pa.timestamp("us")).cast(TS)})
    write_deltalake(str(s.offline_dir / "user_clicks"), table)
    newest = rows.assign(created=c0 + np.arange(len(rows))).sort_values(["ts", "created"]).groupby("user_id").tail(1)
    newest = newest.set_index("user_id")
    # online: the stream's values (created = the batch's time, before its offline rows' created), except
    # 5 users never written online and 5 whose online value is older than their newest offline row
    users = sorted(on["user_id"])
    missing, stale = users[:5], users[5:10]
    sink = OnlineSink(store)
    stream = on[~on["user_id"].isin(missing + stale)]
    cols = ["user_id", "clicks_5m", "event_timestamp"]
    assert sink.write("user_clicks", [{"user_id": u, "clicks_5m": int(n), "event_timestamp": int(t), "created": c0}
                                      for u, n, t in stream[cols].itertuples(index=False)]) == len(stream)
    assert sink.write("user_clicks", [{"user_id": u, "clicks_5m": 999, "event_timestamp": int(newest.loc[u, "ts"]) - 1,
                                       "created": c0 + 10**9} for u in stale]) == len(stale)
    want = on.set_index("user_id")["clicks_5m"].copy()
    want[missing + stale] = newest.loc[missing + stale, "clicks_5m"]
    differs = int((on.set_index("user_id").loc[users, "clicks_5m"].to_numpy()
                   != newest.loc[users, "clicks_5m"].to_numpy()).sum())
    assert differs > 0, "the data must hold users whose newest offline row is staler than the stream's value"

    end = datetime.fromtimestamp(max(r["ts"] for r in clicks) / 1e6 + 1, UTC)
    feast = Path(sys.executable).parent / "feast"
    p = subprocess.run([str(feast), "-c", str(s.feature_repo_dir), "materialize-incremental",
                        end.strftime("%Y-%m-%dT%H:%M:%S")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    got = FeatureStore(repo_path=str(s.feature_repo_dir)).get_online_features(
        features=["user_clicks:clicks_5m"], entity_rows=[{"user_id": u} for u in users]).to_df()
    assert got["clicks_5m"].tolist() == want[users].tolist(), f"{differs} stream values were at stake"


@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-2**63, 2**63 - 1), st.booleans(),
                          st.text(max_size=300)), max_size=30))
def test_values_encode_as_protobuf_writes_them(values: list):
    """The fast encoders write the bytes protobuf writes for each value type, numbers included (a column whose
    python types the fast path does not take goes through protobuf)."""
    from feast.protos.feast.types.Value_pb2 import RepeatedValue

    from driftloop.features.value_encoding import encode_column, proto_numbers, proto_values

    for vt, kinds in ((ValueType.DOUBLE, (int, float)), (ValueType.INT64, (int,)), (ValueType.BOOL, (bool,)),
                      (ValueType.STRING, (str,))):
        col = [v for v in values if v is None or type(v) in kinds]
        enc, nums = encode_column(col, vt)
        want = proto_values(col, vt)
        assert b"".join(enc) == RepeatedValue(val=want).SerializeToString(), vt
        np.testing.assert_array_equal(nums, proto_numbers(want))
