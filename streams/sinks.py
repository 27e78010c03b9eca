"""Sinks of the streams worker: Feast online store and Delta offline tables (idempotent)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from feast import FeatureStore

from driftloop.infra import delta
from driftloop.infra.metrics import FRESHNESS, ROWS_WRITTEN

log = logging.getLogger(__name__)


class OfflineSink:
    """Appends rows to one Delta table per name, skipping source offsets already committed."""

    def __init__(self, root: Path, app: str):
        self.root = root
        self.app = app

    def txn_id(self, topic: str, partition: int) -> str:
        return f"{self.app}:{topic}:{partition}"

    def write(self, name: str, rows: list[dict[str, Any]], offsets: dict[tuple[str, int], int]) -> int:
        """Rows carry ``_topic``, ``_partition``, ``_offset``; a replayed range is dropped."""
        path = self.root / name
        ids = {self.txn_id(t, p): o for (t, p), o in offsets.items()}
        done = delta.applied_offsets(path, list(ids))
        if done:
            rows = [r for r in rows if r["_offset"] > done.get(self.txn_id(r["_topic"], r["_partition"]), -1)]
            ids = {a: o for a, o in ids.items() if o > done.get(a, -1)}
        if not ids:
            return 0
        table = pa.Table.from_pylist(rows) if rows else None
        if table is not None and "event_timestamp" in table.column_names:
            table = table.set_column(table.schema.get_field_index("event_timestamp"), "event_timestamp",
                                     table["event_timestamp"].cast(delta.TS))
        if table is None:
            return 0
        n = delta.append(path, table, ids)
        ROWS_WRITTEN.labels(sink=f"delta:{name}").inc(n)
        return n


class OnlineSink:
    """Writes the newest value per entity to the Feast online store, one call per view and flush."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def write(self, view: str, rows: Iterable[dict[str, Any]], entity_key: str) -> int:
        latest: dict[Any, dict[str, Any]] = {}
        for r in rows:
            cur = latest.get(r[entity_key])
            if cur is None or r["event_timestamp"] >= cur["event_timestamp"]:
                latest[r[entity_key]] = r
        if not latest:
            return 0
        df = pd.DataFrame(list(latest.values()))
        df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], unit="us", utc=True)
        self.store.write_to_online_store(view, df.drop(columns=["_topic", "_partition", "_offset"],
                                                        errors="ignore"))
        now = time.time()
        for ts in df["event_timestamp"]:
            FRESHNESS.observe(max(0.0, now - ts.timestamp()))
        ROWS_WRITTEN.labels(sink=f"online:{view}").inc(len(df))
        return len(df)
