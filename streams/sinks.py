"""Sinks of the streams worker: Delta offline tables (idempotent); the online sink is features.online_write."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable

from driftloop.core import delta
from driftloop.core.metrics import ROWS_WRITTEN

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
        """``cols`` carries ``_topic``, ``_partition``, ``_offset`` (each row's origin, a record of the batch);
        ``offsets`` the batch's last offsets."""
        ids = {self.txn_id(t, p): o for (t, p), o in offsets.items()}
        done = self._applied(name, list(ids))
        if any(done[a] >= 0 for a in ids):
            keep = [i for i, (t, p, o) in enumerate(zip(cols["_topic"], cols["_partition"], cols["_offset"],
                                                          strict=True))
                    if o > done.get(self.txn_id(t, p), -1)]
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
