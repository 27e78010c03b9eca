"""``driftloop bench training``: a point-in-time training set of N labels × the example repo's 3 views.

Synthetic Delta feature tables (as the streams engine writes them) and a label frame go into an isolated
data directory; ``build_training_set`` (Feast + the Delta offline store) joins them. Optionally the same
join on Feast's own DuckDB store over Parquet copies of the tables, for a ratio.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import write_deltalake
from feast import FeatureService, FeatureStore, FeatureView

from driftloop.core.settings import Settings
from driftloop.features.repo import apply
from driftloop.features.training import build_training_set

log = logging.getLogger(__name__)

T0 = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1e6)
DAY_US = 86_400 * 10**6
VIEWS = ("user_impressions", "user_clicks", "user_bid_stats")


def _feature_table(rng: np.random.Generator, view: str, cols: list[str], rows: int, users: int) -> pa.Table:
    ts = np.sort(T0 + rng.integers(0, DAY_US, rows))
    data: dict[str, object] = {"user_id": pa.array(np.char.add("u", rng.integers(0, users, rows).astype(str)))}
    for c in cols:
        data[c] = pa.array(rng.integers(0, 50, rows)) if c.startswith(("impressions", "clicks")) \
            else pa.array(rng.random(rows) * 3)
    tsa = pa.array(ts, pa.timestamp("us", tz="UTC"))
    data |= {"event_timestamp": tsa, "created": tsa, "_topic": pa.array([f"events.{view}"] * rows),
             "_partition": pa.array(np.zeros(rows, np.int64)), "_offset": pa.array(np.arange(rows))}
    return pa.table(data)


def _labels(rng: np.random.Generator, n: int, users: int) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": np.char.add("u", rng.integers(0, users, n).astype(str)),
        "event_timestamp": pd.to_datetime(T0 + rng.integers(0, DAY_US, n), unit="us", utc=True),
        "label": rng.integers(0, 2, n)})


def _names(view: FeatureView) -> list[str]:
    """The view's feature names (a view read back from the registry lists its join key among them)."""
    return [f.name for f in view.features if f.name not in view.join_keys]


def _features(view: FeatureView) -> FeatureView:
    return view[_names(view)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(base: Settings, labels: int = 1_000_000, rows_per_view: int = 1_000_000, users: int = 50_000,
        baseline_labels: int = 0, seed: int = 1) -> dict[str, object]:
    s = Settings(**{**base.model_dump(), "data_dir": base.root / "bench" / f"training-{uuid.uuid4().hex[:6]}"})
    rng = np.random.default_rng(seed)
    store, _plan, _decls = apply(s)
    views = [store.get_stream_feature_view(v) for v in VIEWS]
    t = time.perf_counter()
    for v in views:
        write_deltalake(str(s.offline_dir / v.name), _feature_table(rng, v.name, _names(v), rows_per_view, users))
    log.info("wrote 3 × %d feature rows in %.1f s", rows_per_view, time.perf_counter() - t)
    svc = FeatureService(name="bench_all_views", features=[_features(v) for v in views])
    store.apply([svc])
    entity = _labels(rng, labels, users)
    t = time.perf_counter()
    df, versions = build_training_set(entity, svc, store)
    seconds = time.perf_counter() - t
    filled = float(df[_names(views[0])].notna().all(axis=1).mean())
    print(f"training set: {len(df):,} labels × 3 views ({rows_per_view:,} rows each, {users:,} users) "
          f"in {seconds:.1f} s = {len(df) / seconds:,.0f} labels/s; target 60 s (ratio {60 / seconds:.1f}×); "
          f"rows with features {filled:.0%}; Delta versions {versions}")
    out: dict[str, object] = {"labels": len(df), "rows_per_view": rows_per_view, "seconds": round(seconds, 2),
                              "labels_per_s": round(len(df) / seconds), "target_s": 60,
                              "peak_rss_mb": round(_peak_rss_mb())}
    if baseline_labels:
        out |= _baseline(s, views, entity.head(baseline_labels), store)
    shutil.rmtree(s.data_dir, ignore_errors=True)
    print(json.dumps(out))
    return out


def _baseline(s: Settings, views: list, entity: pd.DataFrame, store: FeatureStore) -> dict[str, object]:
    """The same join on Feast's DuckDB offline store over Parquet copies (Feast's own point-in-time SQL)."""
    from feast import FileSource
    from feast.data_format import ParquetFormat

    from driftloop.core import delta

    repo = s.data_dir / "duckdb_repo"
    repo.mkdir()
    yaml = (s.feature_repo_dir / "feature_store.yaml").read_text()
    (repo / "feature_store.yaml").write_text(  # its own registry; DuckDB has no ``root``
        "\n".join(line for line in yaml.splitlines() if not line.strip().startswith("root:"))
        .replace("driftloop.features.delta_offline_store.DeltaOfflineStore", "duckdb")
        .replace(f"{s.root}/registry.db", f"{repo}/registry.db").replace(f"{s.root}/online.db", f"{repo}/online.db")
        + "\n")
    fvs = []
    for v in views:
        path = repo / f"{v.name}.parquet"
        pq.write_table(pa.Table.from_pandas(delta.read(s.offline_dir / v.name), preserve_index=False), path)
        fvs.append(FeatureView(name=v.name, entities=[store.get_entity("user")], ttl=v.ttl, schema=v.features,
                               source=FileSource(path=str(path), file_format=ParquetFormat(),
                                                 timestamp_field="event_timestamp",
                                                 created_timestamp_column="created")))

    other = FeatureStore(repo_path=str(repo))
    other.apply([store.get_entity("user"), *fvs,
                 FeatureService(name="bench_all_views", features=[_features(v) for v in fvs])])
    t = time.perf_counter()
    theirs, _ = build_training_set(entity, "bench_all_views", other)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    ours, _ = build_training_set(entity, "bench_all_views", store)
    ours_seconds = time.perf_counter() - t
    cols = [c for v in views for c in _names(v)]
    a = theirs.sort_values(["user_id", "event_timestamp"])[cols].to_numpy(float)
    b = ours.sort_values(["user_id", "event_timestamp"])[cols].to_numpy(float)
    same = bool(np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a[~np.isnan(a)], b[~np.isnan(b)]))
    print(f"Feast DuckDB store on Parquet, {len(entity):,} labels: {seconds:.1f} s; Delta store on the same labels: "
          f"{ours_seconds:.1f} s (ratio {seconds / ours_seconds:.1f}×); identical values: {same}")
    return {"baseline_labels": len(entity), "duckdb_parquet_s": round(seconds, 2),
            "delta_same_labels_s": round(ours_seconds, 2), "ratio": round(seconds / ours_seconds, 2),
            "identical": same}
