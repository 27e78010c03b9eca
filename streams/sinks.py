"""Sinks of the streams worker: Delta offline tables (idempotent) and the Feast online store (monotone)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable
from feast import FeatureStore
from feast.infra.online_stores.helpers import _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore

from driftloop.infra import delta
from driftloop.infra.metrics import FRESHNESS, ROWS_WRITTEN

log = logging.getLogger(__name__)


class OfflineSink:
    """Appends column batches to one Delta table per name, skipping source offsets already committed.

    Each commit records the highest offset per ``{app}:{topic}:{partition}`` as a Delta app transaction;
    rows at or below a recorded offset are dropped, so a replay after a crash never duplicates a row.
    Table handles and the recorded offsets are cached; ``reset()`` (after a rebalance) re-reads them.
    """

    def __init__(self, root: Path, app: str):
        self.root = root
        self.app = app
        self.tables: dict[str, DeltaTable] = {}
        self.done: dict[str, dict[str, int]] = {}

    def reset(self) -> None:
        self.tables.clear()
        self.done.clear()

    def txn_id(self, topic: str, partition: int) -> str:
        return f"{self.app}:{topic}:{partition}"

    def _applied(self, name: str, ids: list[str]) -> dict[str, int]:
        done = self.done.setdefault(name, {})
        missing = [a for a in ids if a not in done]
        if missing:
            dt = self.tables.get(name) or delta.open_table(self.root / name)
            for a in missing:
                v = dt.transaction_version(a) if dt is not None else None
                done[a] = -1 if v is None else v
        return done

    def write(self, name: str, cols: dict[str, list[Any]], offsets: dict[tuple[str, int], int]) -> int:
        """``cols`` carries ``_topic``, ``_partition``, ``_offset``; ``offsets`` the batch's last offsets."""
        ids = {self.txn_id(t, p): o for (t, p), o in offsets.items()}
        done = self._applied(name, list(ids))
        if any(done[a] >= 0 for a in ids):
            keep = [i for i, (t, p, o) in enumerate(zip(cols["_topic"], cols["_partition"], cols["_offset"],
                                                          strict=True))
                    if t == "labels" or o > done.get(self.txn_id(t, p), -1)]
            if len(keep) < len(cols["_offset"]):
                cols = {k: [v[i] for i in keep] for k, v in cols.items()}
            ids = {a: o for a, o in ids.items() if o > done[a]}
        if not ids:
            return 0
        table = pa.table(cols)
        for ts_col in ("event_timestamp", "created", "ingested_at"):
            if ts_col in table.column_names:
                i = table.schema.get_field_index(ts_col)
                table = table.set_column(i, ts_col, table[ts_col].cast(pa.int64()).cast(delta.TS))
        dt = self.tables.get(name)
        n = delta.append(dt if dt is not None else self.root / name, table, ids)
        if dt is None:
            self.tables[name] = DeltaTable(str(self.root / name))
        done.update(ids)
        ROWS_WRITTEN.labels(sink=f"delta:{name}").inc(n)
        return n


class OnlineSink:
    """Writes one row per entity to the Feast online store, never replacing a newer row with an older one.

    Feast's stores overwrite unconditionally, so the sink reads the stored event times of the batch's
    entities first (one read per view and flush) and drops rows older than what is stored.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self.provider = store._get_provider()
        self.views: dict[str, Any] = {}

    def write(self, view: str, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        fv = self.views.get(view)
        if fv is None:
            fv = self.views[view] = self.store.get_stream_feature_view(view, allow_registry_cache=True)
        df = pd.DataFrame(rows)
        df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], unit="us", utc=True)
        df["created"] = pd.to_datetime(df["created"], unit="us", utc=True)
        data = self.provider._prep_rows_to_write_for_ingestion(feature_view=fv, df=df, field_mapping=None)
        stored = self.provider.online_read(self.store.config, fv, [d[0] for d in data])
        fresh = [d for d, (ts, _) in zip(data, stored, strict=True) if ts is None or _utc(d[2]) >= _utc(ts)]
        same = [d for d, (ts, _) in zip(data, stored, strict=True) if ts is not None and _utc(d[2]) == _utc(ts)]
        if same:
            self._allow_same_instant(view, same)
        if fresh:
            self.provider.online_write_batch(self.store.config, fv, fresh, progress=None)
        now = time.time()
        for d in fresh:
            FRESHNESS.observe(max(0.0, now - _utc(d[2])))
        ROWS_WRITTEN.labels(sink=f"online:{view}").inc(len(fresh))
        if len(fresh) < len(data):
            log.info("online %s: kept %d newer stored rows", view, len(data) - len(fresh))
        return len(fresh)


    def _allow_same_instant(self, view: str, rows: list[Any]) -> None:
        """Feast's Redis store skips a row whose event time equals the stored one, but a late event inside
        the lateness changes the value without moving the time: forget the stored time of those entities
        first (a crash in between leaves the old value, and the replayed batch writes it again)."""
        online = self.provider.online_store
        if not isinstance(online, RedisOnlineStore):
            return
        cfg = self.store.config
        version = cfg.entity_key_serialization_version
        client = online._get_client(cfg.online_store)
        with client.pipeline(transaction=False) as pipe:
            for d in rows:
                pipe.hdel(_redis_key(cfg.project, d[0], entity_key_serialization_version=version), f"_ts:{view}")
            pipe.execute()


def _utc(ts: datetime) -> float:
    """Epoch seconds; Feast hands back naive UTC datetimes from some stores."""
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC).timestamp()
    return ts.timestamp()
