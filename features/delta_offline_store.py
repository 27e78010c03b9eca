"""A Feast offline store for Delta Lake tables: read through delta-rs, joined in DuckDB.

Select it in ``feature_store.yaml``::

    offline_store:
      type: driftloop.features.delta_offline_store.DeltaOfflineStore

Sources are ``FileSource(path=..., file_format=DeltaFormat(), timestamp_field=..., created_timestamp_column=...)``;
relative paths are relative to the repo. Each read opens the table's current snapshot once
(``DeltaTable.to_pyarrow_dataset``, so deletes and overwrites are honoured) and registers it in DuckDB;
``DeltaRetrievalJob.delta_versions`` records the version read per table, for lineage.

Point-in-time semantics are Feast's: for each entity row, the feature row with the greatest event
timestamp at or before the entity timestamp, not older than the view's ``ttl``; ties on the event
timestamp go to the greatest created timestamp (a late correction wins). Implemented as a DuckDB
``ASOF LEFT JOIN`` after de-duplicating ``(keys, event timestamp)``, so the join is linear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa
from deltalake import write_deltalake
from feast import FeatureView, OnDemandFeatureView
from feast.data_format import DeltaFormat
from feast.data_source import DataSource
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import OfflineStore, RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel, RepoConfig
from feast.saved_dataset import SavedDatasetStorage

from driftloop.core import delta
from driftloop.core.delta import TS

log = logging.getLogger(__name__)
ROW = "__driftloop_row"


class DeltaOfflineStoreConfig(FeastConfigBaseModel):
    """``offline_store`` section of ``feature_store.yaml``."""

    type: Literal["driftloop.features.delta_offline_store.DeltaOfflineStore"] = (
        "driftloop.features.delta_offline_store.DeltaOfflineStore")
    threads: int | None = None
    """DuckDB threads (default: all cores)."""
    memory_limit: str | None = None
    """DuckDB memory limit, e.g. ``"4GB"`` (default: DuckDB's)."""
    root: str | None = None
    """Folder that relative source paths are relative to (driftloop sets its data dir's ``offline``);
    unset: the repo, as in Feast."""


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_path(source: DataSource, config: RepoConfig) -> str:
    """The Delta table a source names (relative paths are relative to the store's ``root``, else the repo)."""
    if not isinstance(source, FileSource) or not isinstance(source.file_format, DeltaFormat):
        raise ValueError(f"source {source.name!r}: the Delta offline store reads FileSource(file_format=DeltaFormat())"
                         f" sources only, got {type(source).__name__}"
                         f"({getattr(source, 'file_format', None)!r})")
    root = getattr(config.offline_store, "root", None) or config.repo_path
    return FileSource.get_uri_for_file_path(Path(root) if root else None, source.path)


class _Reader:
    """One DuckDB connection with each Delta table registered once, at the version first seen."""

    def __init__(self, config: RepoConfig):
        self.config = config
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        oc = config.offline_store
        if getattr(oc, "threads", None):
            self.con.execute(f"SET threads = {int(oc.threads)}")
        if getattr(oc, "memory_limit", None):
            self.con.execute(f"SET memory_limit = '{oc.memory_limit}'")
        self.versions: dict[str, int] = {}
        self._names: dict[str, str] = {}

    def relation(self, source: DataSource, empty: str | None = None) -> str:
        """The registered view name of the source's table, with its field mapping applied.

        A missing table raises FileNotFoundError, unless ``empty`` (a SELECT giving the columns wanted,
        typed) is given: a view declared but not written yet then reads as no rows."""
        path = table_path(source, self.config)
        if path not in self._names:
            name = f"v{len(self._names)}"
            dt = delta.open_table(Path(path))
            if dt is None:
                if empty is None:
                    raise FileNotFoundError(f"source {source.name!r}: no Delta table at {path}")
                log.warning("source %s: no Delta table at %s yet; read as empty", source.name, path)
                self.con.execute(f"CREATE TEMP VIEW {name} AS {empty} LIMIT 0")
                self._names[path] = name
                return name
            self.versions[path] = dt.version()
            raw = f"src{len(self._names)}"
            self.con.register(raw, dt.to_pyarrow_dataset())
            cols = [f.name for f in dt.schema().to_arrow()]
            mapping = source.field_mapping or {}
            sel = ", ".join(f"{_q(c)} AS {_q(mapping.get(c, c))}" for c in cols)
            self.con.execute(f"CREATE TEMP VIEW {name} AS SELECT {sel} FROM {raw}")
            self._names[path] = name
        return self._names[path]

    def arrow(self, sql: str) -> pa.Table:
        return _utc(self.con.sql(sql).to_arrow_table())


def _utc(table: pa.Table) -> pa.Table:
    """Timestamps as ``timestamp[us, UTC]``."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type != TS:
            col = table.column(i)
            if f.type.tz is None:
                col = col.cast(pa.timestamp(f.type.unit)).cast(pa.timestamp(f.type.unit, tz="UTC"))
            table = table.set_column(i, pa.field(f.name, TS), col.cast(TS))
    return table


def _columns(keys: list[str], features: list[str], ts: str, created: str | None) -> list[str]:
    return [*keys, *features, ts, *([created] if created else [])]


def _nulls(cols: list[str]) -> str:
    """A SELECT of typeless NULL columns (the stand-in for a table not written yet)."""
    return "SELECT " + ", ".join(f"NULL AS {_q(c)}" for c in cols)


def _lit(ts: datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return f"TIMESTAMPTZ '{ts.astimezone(UTC).isoformat()}'"


class DeltaRetrievalJob(RetrievalJob):
    """A lazy query: runs when ``to_df``/``to_arrow`` is called (each call reads the snapshot it opened)."""

    def __init__(self, run: Callable[[], pa.Table], reader: _Reader, full_feature_names: bool = False,
                 on_demand_feature_views: list[OnDemandFeatureView] | None = None,
                 metadata: RetrievalMetadata | None = None):
        self._run = run
        self._reader = reader
        self._full_feature_names = full_feature_names
        self._odfvs = on_demand_feature_views or []
        self._metadata = metadata

    @property
    def delta_versions(self) -> dict[str, int]:
        """Table path → Delta version read (lineage)."""
        return dict(self._reader.versions)

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self._odfvs

    @property
    def metadata(self) -> RetrievalMetadata | None:
        return self._metadata

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        return self._run()

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._run().to_pandas()

    def persist(self, storage: SavedDatasetStorage, allow_overwrite: bool = False,
                timeout: int | None = None) -> None:
        """Write the result as a Delta table at the storage's path."""
        path = storage.to_data_source().path  # type: ignore[attr-defined]
        mode = "overwrite" if allow_overwrite else "error"
        write_deltalake(path, self.to_arrow(), mode=mode)


def _entity_table(entity_df: pd.DataFrame, ts_col: str) -> pa.Table:
    df = entity_df.copy()
    df[ts_col] = pd.to_datetime(df[ts_col], utc=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = _utc(table)
    return table.append_column(ROW, pa.array(range(len(df)), pa.int64()))


class DeltaOfflineStore(OfflineStore):
    """Feast offline store over Delta tables (delta-rs snapshot → DuckDB)."""

    @staticmethod
    def get_historical_features(config: RepoConfig, feature_views: list[FeatureView], feature_refs: list[str],
                                entity_df: pd.DataFrame | str | None, registry: BaseRegistry, project: str,
                                full_feature_names: bool = False, **kwargs: Any) -> RetrievalJob:
        if not isinstance(entity_df, pd.DataFrame):
            raise ValueError("the Delta offline store needs entity_df as a pandas DataFrame "
                             "(SQL entity queries and entity-less retrieval are not supported)")
        ts_col = infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes, strict=True)))
        entities = _entity_table(entity_df, ts_col)
        reader = _Reader(config)
        reader.con.register("entities", entities)
        selects: list[str] = []
        joins: list[str] = []
        for i, fv in enumerate(feature_views):
            prefix = fv.projection.name_to_use()
            feats = [r.split(":", 1)[1] for r in feature_refs if r.startswith(f"{prefix}:")]
            if not feats:
                continue
            out_names = [f"{fv.projection.name_alias or fv.name}__{f}" if full_feature_names else f for f in feats]
            key_map = fv.projection.join_key_map or {e.name: e.name for e in fv.entity_columns}
            src = fv.batch_source
            ts, created = src.timestamp_field, src.created_timestamp_column
            keys = list(key_map)
            empty = ", ".join([*(f"e.{_q(key_map[k])} AS {_q(k)}" for k in keys), f"e.{_q(ts_col)} AS {_q(ts)}",
                               *([f"e.{_q(ts_col)} AS {_q(created)}"] if created else []),
                               *(f"NULL::DOUBLE AS {_q(f)}" for f in feats)])
            rel = reader.relation(src, f"SELECT {empty} FROM entities e")
            ttl_us = int(fv.ttl.total_seconds() * 1e6) if fv.ttl else 0
            order = f"{_q(created)} DESC" if created else "1"
            part = ", ".join([*map(_q, keys), _q(ts)])
            fsel = ", ".join([*(f"{_q(k)} AS k{j}" for j, k in enumerate(keys)), f"{_q(ts)} AS ts",
                              *(f"{_q(f)} AS f{j}" for j, f in enumerate(feats))])
            on = " AND ".join([*(f"e.{_q(key_map[k])} = f.k{j}" for j, k in enumerate(keys)),
                               f"e.{_q(ts_col)} >= f.ts"])
            expired = f"f.ts < e.{_q(ts_col)} - to_microseconds({ttl_us})" if ttl_us else "FALSE"
            cols = ", ".join(f"CASE WHEN {expired} THEN NULL ELSE f.f{j} END AS {_q(n)}"
                             for j, n in enumerate(out_names))
            joins.append(
                f"LEFT JOIN (SELECT e.{ROW}, {cols} FROM entities e ASOF LEFT JOIN ("
                f"SELECT {fsel} FROM {rel} WHERE {_q(ts)} <= (SELECT max({_q(ts_col)}) FROM entities)"
                f" QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY {order}) = 1) f ON {on}) j{i}"
                f" USING ({ROW})")
            selects += [f"j{i}.{_q(n)}" for n in out_names]

        def run() -> pa.Table:
            sql = (f"SELECT e.* EXCLUDE ({ROW}){''.join(', ' + s for s in selects)} FROM entities e "
                   f"{' '.join(joins)} ORDER BY e.{ROW}")
            return reader.arrow(sql)

        odfvs = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
        tsv = entity_df[ts_col]
        meta = RetrievalMetadata(features=feature_refs, keys=[c for c in entity_df.columns if c != ts_col],
                                 min_event_timestamp=pd.to_datetime(tsv.min(), utc=True).to_pydatetime(),
                                 max_event_timestamp=pd.to_datetime(tsv.max(), utc=True).to_pydatetime())
        return DeltaRetrievalJob(run, reader, full_feature_names, odfvs, meta)

    @staticmethod
    def pull_latest_from_table_or_query(config: RepoConfig, data_source: DataSource, join_key_columns: list[str],
                                        feature_name_columns: list[str], timestamp_field: str,
                                        created_timestamp_column: str | None, start_date: datetime,
                                        end_date: datetime) -> RetrievalJob:
        """The newest row per entity with its event time in [start_date, end_date] (``materialize``)."""
        reader = _Reader(config)
        cols = _columns(join_key_columns, feature_name_columns, timestamp_field, created_timestamp_column)
        order = ", ".join(f"{_q(c)} DESC" for c in [timestamp_field, created_timestamp_column] if c)
        part = f"PARTITION BY {', '.join(map(_q, join_key_columns))} " if join_key_columns else ""

        def run() -> pa.Table:
            rel = reader.relation(data_source, _nulls(cols))
            return reader.arrow(
                f"SELECT {', '.join(map(_q, cols))} FROM {rel} WHERE {_q(timestamp_field)} "
                f"BETWEEN {_lit(start_date)} AND {_lit(end_date)} "
                f"QUALIFY row_number() OVER ({part}ORDER BY {order}) = 1")

        return DeltaRetrievalJob(run, reader)

    @staticmethod
    def pull_all_from_table_or_query(config: RepoConfig, data_source: DataSource, join_key_columns: list[str],
                                     feature_name_columns: list[str], timestamp_field: str,
                                     created_timestamp_column: str | None = None, start_date: datetime | None = None,
                                     end_date: datetime | None = None) -> RetrievalJob:
        """Every row with its event time in the (optional) range."""
        reader = _Reader(config)
        cols = _columns(join_key_columns, feature_name_columns, timestamp_field, created_timestamp_column)
        where = [f"{_q(timestamp_field)} >= {_lit(start_date)}" if start_date else "TRUE",
                 f"{_q(timestamp_field)} <= {_lit(end_date)}" if end_date else "TRUE"]

        def run() -> pa.Table:
            rel = reader.relation(data_source, _nulls(cols))
            return reader.arrow(f"SELECT {', '.join(map(_q, cols))} FROM {rel} WHERE {' AND '.join(where)}")

        return DeltaRetrievalJob(run, reader)

    @staticmethod
    def offline_write_batch(config: RepoConfig, feature_view: FeatureView, table: pa.Table,
                            progress: Callable[[int], Any] | None) -> None:
        """Append ``table`` to the view's Delta table (its columns must match the table's, in any order)."""
        path = table_path(feature_view.batch_source, config)
        table = _utc(table)
        dt = delta.open_table(Path(path))
        schema = None if dt is None else dt.schema().to_arrow()
        if schema is not None:
            want = {f.name for f in schema}
            if set(table.column_names) != want:
                raise ValueError(f"view {feature_view.name}: columns {sorted(table.column_names)} do not match "
                                 f"the Delta table's {sorted(want)} at {path}")
            table = table.select([f.name for f in schema])
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_deltalake(path, table, mode="append")
        if progress:
            progress(table.num_rows)


__all__ = ["DeltaOfflineStore", "DeltaOfflineStoreConfig", "DeltaRetrievalJob", "table_path"]
