"""Point-in-time training sets of a declared model through Feast and the Delta offline store.

Each label of the model (``labels`` table, one per scored event) becomes an entity row at the scored
event's time, carrying the event's key and request fields (from the scored topic's bronze table).
``build_training_set`` joins every view of the model's feature service with Feast's
``get_historical_features`` on the Delta plugin, one microsecond *before* the event: the stream writes
a view row at the event's own time that already counts it, and serving scored the event with the
value from before it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
from feast import FeatureService, FeatureStore

from driftloop.core import delta
from driftloop.core.declarations import ModelSpec, bronze_table
from driftloop.core.settings import Settings
from driftloop.features.delta_offline_store import DeltaRetrievalJob
from driftloop.features.repo import open_store

log = logging.getLogger(__name__)

BEFORE = pd.Timedelta(microseconds=1)
LABELS = "labels"


def _labels(offline: Path, model: str, since_ts: int | None, columns: list[str]) -> pd.DataFrame:
    """The rows of ``model`` in the labels table (optionally at or after ``since_ts``), as stored."""
    dt = delta.open_table(offline / LABELS)
    if dt is None:
        return pd.DataFrame(columns=columns)
    cond = pc.field("model_name") == model
    if since_ts is not None:
        cond = cond & (pc.field("ts") >= since_ts)
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=cond).to_pandas()


def count_labels(offline_dir: Path, model: str, since_ts: int | None = None) -> int:
    """Labelled scored events of ``model`` (distinct event ids), at or after ``since_ts`` when given."""
    df = _labels(offline_dir, model, since_ts, ["event_id"])
    return int(df["event_id"].nunique())


def labelled_events(settings: Settings, spec: ModelSpec, since_ts: int | None = None,
                    max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """Feast entity rows of the model's labels: ``event_id``, the key, ``ts``, ``label``, ``event_timestamp``
    and the request fields, oldest first (the newest ``max_rows``); plus the Delta versions read."""
    offline, bronze = settings.offline_dir, bronze_table(spec.topic)
    versions = {name: delta.version(offline / name) for name in (LABELS, bronze)}
    labels = _labels(offline, spec.name, since_ts, ["event_id", "label", "created"])
    # the newest label of an event wins: by write time (a Delta table's files come back in no set order)
    labels = labels.sort_values("created", kind="stable").drop_duplicates("event_id", keep="last")
    labels = labels.drop(columns="created")
    events = delta.read(offline / bronze, ["event_id", spec.key, "ts", *spec.request_fields])
    events = events.drop_duplicates("event_id", keep="first")
    df = labels.merge(events, on="event_id", how="inner", validate="one_to_one")
    df = df.sort_values("ts", kind="stable")
    if max_rows:
        df = df.tail(max_rows)
    df[spec.key] = df[spec.key].astype("int64" if spec.key_type == "int" else str)
    df["event_timestamp"] = pd.to_datetime(df["ts"].astype("int64"), unit="us", utc=True)
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


def training_set(settings: Settings, spec: ModelSpec, since_ts: int | None = None,
                 max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """The model's training set: ``event_id``, the key, ``ts``, ``label`` + ``spec.features`` (missing
    values NaN), oldest first; plus the Delta versions of the labels, bronze and view tables read."""
    columns = ["event_id", spec.key, "ts", "label", *spec.features]
    labels, versions = labelled_events(settings, spec, since_ts, max_rows)
    if labels.empty:
        return pd.DataFrame(columns=columns), versions
    df, fv_versions = build_training_set(labels, spec.feature_service, open_store(settings))
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    return df[columns], {**versions, **fv_versions}
