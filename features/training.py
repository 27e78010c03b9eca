"""Point-in-time training sets through Feast and the Delta offline store.

Each label (one impression) becomes an entity row at the impression's event time, carrying the
impression's request features (from the bronze table). ``build_training_set`` joins every view of a
feature service with Feast's ``get_historical_features`` on the Delta plugin, one microsecond *before*
the impression: the stream writes a view row at the impression's own time that already counts it, and
serving scored the impression with the value from before it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
from feast import FeatureService, FeatureStore

from driftloop.features.delta_offline_store import DeltaRetrievalJob
from driftloop.features.repo import open_store
from driftloop.features.vectors import FEATURE_COLUMNS, FEATURE_SERVICE, request_frame
from driftloop.core import delta
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

BEFORE = pd.Timedelta(microseconds=1)


def count_labels(offline: Path, since_ts: int | None = None) -> int:
    df = delta.read(offline / "labels", columns=["impression_id", "ts"])
    if since_ts is not None:
        df = df[df["ts"] >= since_ts]
    return int(df["impression_id"].nunique()) if len(df) else 0


def labelled_impressions(offline: Path, since_ts: int | None = None,
                         max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """Entity rows: ``impression_id, user_id, label, ts, event_timestamp`` + request features, oldest first;
    plus the Delta versions of ``labels`` and ``bronze_impressions`` read."""
    versions = {name: delta.version(offline / name) for name in ["labels", "bronze_impressions"]}
    labels = delta.read(offline / "labels", columns=["impression_id", "user_id", "label", "ts"])
    labels = labels.drop_duplicates("impression_id", keep="last")
    if since_ts is not None:
        labels = labels[labels["ts"] >= since_ts]
    labels = labels.sort_values("ts", kind="stable")
    if max_rows:
        labels = labels.tail(max_rows)
    imps = delta.read(offline / "bronze_impressions", columns=["event_id", "position", "bid", "device"])
    imps = imps.drop_duplicates("event_id").rename(columns={"event_id": "impression_id"})
    df = labels.merge(imps, on="impression_id", how="inner")
    df = pd.concat([df[["impression_id", "user_id", "label", "ts"]], request_frame(df)], axis=1)
    df["event_timestamp"] = pd.to_datetime(df["ts"], unit="us", utc=True)
    return df.reset_index(drop=True), versions


def build_training_set(labels: pd.DataFrame, feature_service: str | FeatureService,
                       store: FeatureStore) -> tuple[pd.DataFrame, dict[str, int]]:
    """``labels`` (entity columns + ``event_timestamp`` + anything else) joined point-in-time with every
    feature of ``feature_service``, as of just before each row's time; plus ``{table: Delta version}``."""
    svc = store.get_feature_service(feature_service) if isinstance(feature_service, str) else feature_service
    t = time.perf_counter()
    entity = labels.assign(event_timestamp=pd.to_datetime(labels["event_timestamp"], utc=True) - BEFORE)
    job = store.get_historical_features(entity_df=entity, features=svc)
    df = job.to_df()
    df["event_timestamp"] = df["event_timestamp"] + BEFORE
    versions = {}
    if isinstance(job, DeltaRetrievalJob):
        versions = {Path(p).name: v for p, v in job.delta_versions.items()}
    log.info("training set: %d rows × %d features of %s in %.1f s (versions %s)", len(df),
             len(df.columns) - len(labels.columns), svc.name, time.perf_counter() - t, versions)
    return df, versions


def training_set(settings: Settings, since_ts: int | None = None,
                 max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """The model's training set: ``impression_id, user_id, ts, label`` + FEATURE_COLUMNS, oldest first."""
    labels, versions = labelled_impressions(settings.offline_dir, since_ts, max_rows)
    if labels.empty:
        return pd.DataFrame(columns=["impression_id", "user_id", "ts", "label", *FEATURE_COLUMNS]), versions
    df, fv_versions = build_training_set(labels, FEATURE_SERVICE, open_store(settings))
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    return df[["impression_id", "user_id", "ts", "label", *FEATURE_COLUMNS]], {**versions, **fv_versions}
