"""Delta Lake helpers shared by writers and readers: idempotent appends, reads as pandas.

Idempotency: each append carries Delta app-transaction ids ``{app}:{topic}:{partition}`` with the
highest source offset it covers; a replay after a crash drops rows at or below the recorded offset.
All timestamps are ``timestamp[us, UTC]``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

TS = pa.timestamp("us", tz="UTC")


def open_table(path: Path) -> DeltaTable | None:
    try:
        return DeltaTable(str(path))
    except TableNotFoundError:
        return None


def applied_offsets(path: Path, app_ids: list[str]) -> dict[str, int]:
    """Highest source offset already committed per app id (missing = none)."""
    dt = open_table(path)
    if dt is None:
        return {}
    out = {}
    for a in app_ids:
        v = dt.transaction_version(a)
        if v is not None:
            out[a] = v
    return out


def append(target: Path | DeltaTable, table: pa.Table, offsets: dict[str, int] | None = None) -> int:
    """Append ``table`` with one commit that also records ``offsets``; returns rows written.

    ``target`` is a path, or an open table (cheaper: no log replay; it moves to the new version)."""
    if table.num_rows == 0 and not offsets:
        return 0
    props = None
    if offsets:
        props = CommitProperties(app_transactions=[Transaction(app_id=a, version=v) for a, v in offsets.items()])
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        target = str(target)  # type: ignore[assignment]
    write_deltalake(target, table, mode="append", commit_properties=props, schema_mode="merge")
    return table.num_rows


def read(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """The whole table as pandas (empty frame if it does not exist)."""
    dt = open_table(path)
    if dt is None:
        return pd.DataFrame(columns=columns or [])
    return dt.to_pyarrow_dataset().to_table(columns=columns).to_pandas()


def version(path: Path) -> int | None:
    dt = open_table(path)
    return None if dt is None else dt.version()
