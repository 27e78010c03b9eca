"""Offline store conformance: the same cases against driftloop's Delta plugin and Feast's DuckDB store on
Parquet (modelled on Feast's universal offline-store tests), checked against a brute-force pandas oracle.
Then Delta-only cases: late corrections, TTL expiry and deletes; and the version recorded for lineage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake
from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, ValueType
from feast.data_format import DeltaFormat, ParquetFormat
from feast.types import Float64, Int64

T0 = datetime(2026, 11, 1, tzinfo=UTC)
STORES = {
    "delta": "driftloop.features.delta_offline_store.DeltaOfflineStore",
    "duckdb-parquet": "duckdb",
}
YAML = """\
project: conformance
provider: local
registry: {repo}/registry.db
online_store:
  type: sqlite
  path: {repo}/online.db
offline_store:
  type: {store}
entity_key_serialization_version: 3
"""


def _rows(seed: int, users: int, n: int) -> pd.DataFrame:
    """Feature rows with duplicate event times (late corrections carry a later ``created``)."""
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(rng.integers(0, 4 * 3600, n) // 60 * 60, unit="s")  # minute grid: ties
    df = pd.DataFrame({"user_id": rng.integers(0, users, n).astype(np.int64),
                       "event_timestamp": ts,
                       "created": ts + pd.to_timedelta(rng.integers(0, 3600, n), unit="s"),
                       "x": rng.normal(size=n), "n": rng.integers(0, 1000, n).astype(np.int64)})
    for c in ("event_timestamp", "created"):
        df[c] = pd.to_datetime(df[c], utc=True).astype("datetime64[us, UTC]")
    return df


def _write(kind: str, path: Path, df: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    if kind == "delta":
        write_deltalake(str(path), table, mode="overwrite")
    else:
        pq.write_table(table, str(path))


def _oracle(entity: pd.DataFrame, feats: pd.DataFrame, ttl: timedelta, cols: list[str],
            key: str = "user_id") -> pd.DataFrame:
    """Per entity row: the feature row with the greatest (event_timestamp, created) at or before it, within ttl."""
    out = []
    by_key = {k: g for k, g in feats.groupby(key)}
    for k, t in zip(entity[key], entity["event_timestamp"], strict=True):
        g = by_key.get(k)
        hit = None
        if g is not None:
            g = g[(g["event_timestamp"] <= t) & (g["event_timestamp"] >= t - ttl)]
            if len(g):
                hit = g.sort_values(["event_timestamp", "created"]).iloc[-1]
        out.append({c: (np.nan if hit is None else hit[c]) for c in cols})
    return pd.DataFrame(out)


@pytest.fixture(params=list(STORES))
def repo(request, tmp_path: Path):
    kind = request.param
    ext = "" if kind == "delta" else ".parquet"
    fmt = DeltaFormat() if kind == "delta" else ParquetFormat()
    a, b = _rows(1, 50, 4000), _rows(2, 50, 1500)
    b = b.rename(columns={"x": "score_src"})
    _write(kind, tmp_path / f"stats_a{ext}", a)
    _write(kind, tmp_path / f"stats_b{ext}", b)
    (tmp_path / "feature_store.yaml").write_text(YAML.format(repo=tmp_path, store=STORES[kind]))
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    fa = FeatureView(name="fa", entities=[user], ttl=timedelta(hours=1), schema=[
        Field(name="x", dtype=Float64), Field(name="n", dtype=Int64)],
        source=FileSource(name="src_a", path=str(tmp_path / f"stats_a{ext}"), file_format=fmt,
                          timestamp_field="event_timestamp", created_timestamp_column="created"))
    fb = FeatureView(name="fb", entities=[user], ttl=timedelta(minutes=10), schema=[
        Field(name="score", dtype=Float64), Field(name="n", dtype=Int64)],
        source=FileSource(name="src_b", path=str(tmp_path / f"stats_b{ext}"), file_format=fmt,
                          timestamp_field="event_timestamp", created_timestamp_column="created",
                          field_mapping={"score_src": "score"}))
    svc = FeatureService(name="svc", features=[fa[["x"]], fb])
    store = FeatureStore(repo_path=str(tmp_path))
    store.apply([user, fa, fb, svc])
    return kind, store, a, b.rename(columns={"score_src": "score"})


def _entity_df(a: pd.DataFrame, seed: int = 3, n: int = 1500) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(rng.integers(0, 5 * 3600, n), unit="s")
    df = pd.DataFrame({"user_id": rng.integers(0, 60, n).astype(np.int64),  # some users have no rows
                       "event_timestamp": pd.to_datetime(ts, utc=True), "req": np.arange(n)})
    exact = a.sample(200, random_state=seed)[["user_id", "event_timestamp"]]  # timestamps equal to a row's
    exact = exact.assign(req=np.arange(n, n + len(exact)))
    df = pd.concat([df, exact], ignore_index=True)
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    return df


def _check(got: pd.DataFrame, want: pd.DataFrame, cols: list[str]) -> None:
    for c in cols:
        g = pd.to_numeric(got[c], errors="coerce").to_numpy(float)
        w = pd.to_numeric(want[c], errors="coerce").to_numpy(float)
        differ = int((np.isnan(g) != np.isnan(w)).sum())
        assert differ == 0, f"{c}: nulls differ in {differ} rows"
        m = ~np.isnan(w)
        assert np.allclose(g[m], w[m], rtol=0, atol=0), f"{c}: {int((g[m] != w[m]).sum())} values differ"


def test_point_in_time_ttl_and_created_tie_break(repo):
    _kind, store, a, b = repo
    entity = _entity_df(a)
    got = store.get_historical_features(entity_df=entity, features=["fa:x", "fa:n", "fb:score"]).to_df()
    got = got.sort_values("req").reset_index(drop=True)
    assert len(got) == len(entity)
    assert list(got["req"]) == list(range(len(entity)))
    _check(got, _oracle(entity, a, timedelta(hours=1), ["x", "n"]), ["x", "n"])
    _check(got, _oracle(entity, b, timedelta(minutes=10), ["score"]), ["score"])


def test_feature_service_with_full_feature_names(repo):
    _kind, store, a, b = repo
    entity = _entity_df(a, seed=4, n=400)
    got = store.get_historical_features(entity_df=entity, features=store.get_feature_service("svc"),
                                        full_feature_names=True).to_df()
    got = got.sort_values("req").reset_index(drop=True)
    assert {"fa__x", "fb__score", "fb__n"} <= set(got.columns) and "fa__n" not in got.columns
    want_a = _oracle(entity, a, timedelta(hours=1), ["x"]).rename(columns={"x": "fa__x"})
    want_b = _oracle(entity, b, timedelta(minutes=10), ["score", "n"]).add_prefix("fb__")
    _check(got, want_a, ["fa__x"])
    _check(got, want_b, ["fb__score", "fb__n"])


def test_materialize_pulls_latest_per_entity(repo):
    _kind, store, a, _b = repo
    end = T0 + timedelta(hours=2)
    store.materialize(start_date=T0, end_date=end, feature_views=["fa"])
    users = sorted(a["user_id"].unique())
    online = store.get_online_features(features=["fa:x", "fa:n"],
                                       entity_rows=[{"user_id": int(u)} for u in users]).to_df()
    win = a[a["event_timestamp"] <= end].sort_values(["event_timestamp", "created"]).groupby("user_id").tail(1)
    want = win.set_index("user_id").reindex(users)
    assert np.allclose(online["x"].to_numpy(float), want["x"].to_numpy(float), equal_nan=True)
    assert (online["n"].fillna(-1).to_numpy() == want["n"].fillna(-1).to_numpy()).all()


def test_offline_write_batch_is_read_back(repo):
    _kind, store, a, _b = repo
    t = T0 + timedelta(hours=6)
    new = pd.DataFrame({"user_id": np.array([7, 8], np.int64), "event_timestamp": [t, t], "created": [t, t],
                        "x": [100.0, 200.0], "n": np.array([1, 2], np.int64)})
    for c in ("event_timestamp", "created"):
        new[c] = pd.to_datetime(new[c], utc=True).astype("datetime64[us, UTC]")
    store.write_to_offline_store("fa", new[a.columns])
    entity = pd.DataFrame({"user_id": np.array([7, 8], np.int64),
                           "event_timestamp": pd.to_datetime([t + timedelta(seconds=1)] * 2, utc=True)})
    got = store.get_historical_features(entity_df=entity, features=["fa:x", "fa:n"]).to_df()
    assert got.sort_values("user_id")["x"].tolist() == [100.0, 200.0]


def test_delta_late_corrections_ttl_expiry_and_deletes(tmp_path: Path):
    """Exact expected rows, Delta only: a correction wins its tie, TTL expires, a delete falls back."""
    path = tmp_path / "stats"
    t = T0

    def rows(uids, ts, created, xs):
        tz = pa.timestamp("us", "UTC")
        return pa.table({"user_id": pa.array(uids, pa.int64()), "event_timestamp": pa.array(ts, tz),
                         "created": pa.array(created, tz), "x": pa.array(xs, pa.float64())})

    m = timedelta(minutes=1)
    write_deltalake(str(path), rows([1, 1, 2, 3], [t, t + 5 * m, t, t], [t, t + 5 * m, t, t], [1.0, 2.0, 10.0, 30.0]))
    write_deltalake(str(path), rows([1], [t + 5 * m], [t + 9 * m], [2.5]), mode="append")  # late correction
    (tmp_path / "feature_store.yaml").write_text(YAML.format(repo=tmp_path, store=STORES["delta"]))
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
    fv = FeatureView(name="fv", entities=[user], ttl=timedelta(minutes=30), schema=[Field(name="x", dtype=Float64)],
                     source=FileSource(name="s", path="stats", file_format=DeltaFormat(),
                                       timestamp_field="event_timestamp", created_timestamp_column="created"))
    store = FeatureStore(repo_path=str(tmp_path))
    store.apply([user, fv])
    entity = pd.DataFrame({"user_id": np.array([1, 1, 1, 2, 2, 3], np.int64),
                           "event_timestamp": pd.to_datetime([t - m, t + 4 * m, t + 5 * m, t + 29 * m, t + 31 * m,
                                                              t + 10 * m], utc=True)})

    def xs():
        job = store.get_historical_features(entity_df=entity, features=["fv:x"])
        return job.to_df()["x"].tolist(), job

    got, job = xs()
    assert np.isnan(got[0]) and got[1:3] == [1.0, 2.5]  # before any row; tie on t+5m: the correction
    assert got[3] == 10.0 and np.isnan(got[4]) and got[5] == 30.0  # 31 min after its only row: expired
    assert list(job.delta_versions.values()) == [1]
    DeltaTable(str(path)).delete("user_id = 1 AND x = 2.5")  # the correction is withdrawn
    DeltaTable(str(path)).delete("user_id = 3")
    got, job = xs()
    assert got[1:3] == [1.0, 2.0] and np.isnan(got[5])
    assert list(job.delta_versions.values()) == [3]
