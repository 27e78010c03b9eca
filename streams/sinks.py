"""Sinks of the streams worker: Delta offline tables and the labels table (both idempotent); the online sink
is features.online_write."""

from __future__ import annotations

import logging
import operator
from functools import reduce
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
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
        cols, ids = self._fresh(cols, ids, done)
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

    def _fresh(self, cols: dict[str, list[Any]], ids: dict[str, int], done: dict[str, int]
               ) -> tuple[dict[str, list[Any]], dict[str, int]]:
        """The rows not written yet (origin above the recorded offset) and the offsets to record."""
        if any(done[a] >= 0 for a in ids):
            keep = [i for i, (t, p, o) in enumerate(zip(cols["_topic"], cols["_partition"], cols["_offset"],
                                                          strict=True))
                    if o > done.get(self.txn_id(t, p), -1)]
            cols = _take(cols, keep)
            ids = {a: o for a, o in ids.items() if o > done[a]}
        return cols, ids


def _take(cols: dict[str, list[Any]], keep: list[int]) -> dict[str, list[Any]]:
    if len(keep) == len(next(iter(cols.values()), ())):
        return cols
    return {k: [v[i] for i in keep] for k, v in cols.items()}


class LabelSink(OfflineSink):
    """The ``labels`` table, idempotent by (model, scored event id) rather than by origin offsets.

    A label row's origin is the record that made it final, and a replay can close the same join on another
    record (another batch cut, or the scored and outcome topics fetched in another interleaving), so neither
    the origin nor the offsets a saved state covers say whether a row was written: a run that fetched the
    outcomes first closes a join on its scored event and writes the row, a kill -9 loses its state, and the
    next run saves a state with that join still open at a later offset. ``reset(floors)`` reads back the
    (model, event id) of every row at or after the earliest event time the recovered engine can still emit a
    label for (``FeatureEngine.label_floors``, per model and partition); a join that closes on one of them
    again skips its row. Any other label is new."""

    def __init__(self, root: Path, app: str, table: str = "labels"):
        super().__init__(root, app)
        self.table = table
        self.written: set[tuple[str, str]] = set()  # (model, event id) of rows a join may close again on

    def reset(self, floors: dict[tuple[str, int], int | None] | None = None) -> None:
        """After an assignment (``floors``: (model, partition) → earliest event time, None for any); without
        ``floors`` only the cached table handles are dropped (a retry after a failed write)."""
        super().reset()
        if floors is None:
            return
        self.written = set()
        dt = delta.open_table(self.root / self.table)
        if dt is None or not floors:
            return
        f = ds.field
        where = reduce(operator.or_, [(f("model_name") == m) & (f("_partition") == p)
                                      & (f("ts") >= lo if lo is not None else ds.scalar(True))
                                      for (m, p), lo in floors.items()])
        got = dt.to_pyarrow_dataset().to_table(columns=["model_name", "event_id"], filter=where)
        self.written = set(zip(got["model_name"].to_pylist(), got["event_id"].to_pylist(), strict=True))
        log.info("labels: %d rows already written whose joins may close again: they get no second row",
                 len(self.written))

    def _fresh(self, cols: dict[str, list[Any]], ids: dict[str, int], done: dict[str, int]
               ) -> tuple[dict[str, list[Any]], dict[str, int]]:
        if self.written:
            cols = _take(cols, [i for i, k in enumerate(zip(cols["model_name"], cols["event_id"], strict=True))
                                if k not in self.written])
        if not cols or not cols["event_id"]:
            return cols, {}
        return cols, {a: max(o, done[a]) for a, o in ids.items()}  # the highest origin ever written
