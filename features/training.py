"""Point-in-time training sets from the Delta offline store.

Each label (one impression) is joined with the impression's request features (bronze table) and,
per stream feature view, the entity's newest feature row strictly before the impression's event time
(``merge_asof``, backward) — what the online store held when the impression was scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from driftloop.features.vectors import FEATURE_COLUMNS, request_features
from driftloop.infra import delta

log = logging.getLogger(__name__)

NS = "datetime64[ns, UTC]"
VIEWS = {"user_impressions": ["impressions_1m", "mean_bid_1m"], "user_clicks": ["clicks_5m"]}


def count_labels(offline: Path, since_ts: int | None = None) -> int:
    df = delta.read(offline / "labels", columns=["impression_id", "ts"])
    if since_ts is not None:
        df = df[df["ts"] >= since_ts]
    return int(df["impression_id"].nunique()) if len(df) else 0


def build_training_set(offline: Path, since_ts: int | None = None,
                       max_rows: int | None = None) -> tuple[pd.DataFrame, dict[str, int | None]]:
    """DataFrame with FEATURE_COLUMNS, ``label``, ``ts``; plus the Delta versions read (lineage)."""
    versions = {name: delta.version(offline / name) for name in ["labels", "bronze_impressions", *VIEWS]}
    labels = delta.read(offline / "labels", columns=["impression_id", "user_id", "label", "ts"])
    labels = labels.drop_duplicates("impression_id", keep="last")
    if since_ts is not None:
        labels = labels[labels["ts"] >= since_ts]
    labels = labels.sort_values("ts")
    if max_rows:
        labels = labels.tail(max_rows)
    imps = delta.read(offline / "bronze_impressions", columns=["event_id", "position", "bid", "device"])
    imps = imps.drop_duplicates("event_id")
    df = labels.merge(imps, left_on="impression_id", right_on="event_id", how="inner")
    req = pd.DataFrame([request_features(r) for r in df[["position", "bid", "device"]].to_dict("records")],
                       index=df.index)
    df = pd.concat([df[["impression_id", "user_id", "label", "ts"]], req], axis=1)
    df["event_timestamp"] = pd.to_datetime(df["ts"], unit="us", utc=True).astype(NS)
    df = df.sort_values("event_timestamp")
    for view, cols in VIEWS.items():
        feats = delta.read(offline / view, columns=["user_id", "event_timestamp", *cols])
        if feats.empty:
            for c in cols:
                df[c] = float("nan")
            continue
        feats["event_timestamp"] = pd.to_datetime(feats["event_timestamp"], utc=True).astype(NS)
        feats = feats.sort_values("event_timestamp")
        df = pd.merge_asof(df, feats, on="event_timestamp", by="user_id", direction="backward",
                           allow_exact_matches=False)
    log.info("training set: %d rows (since_ts=%s)", len(df), since_ts)
    return df[["impression_id", "user_id", "ts", "label", *FEATURE_COLUMNS]].reset_index(drop=True), versions
