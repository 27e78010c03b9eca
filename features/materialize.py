"""A Feast batch engine for views whose batch source already holds computed feature rows.

Feast's local engine treats a stream feature view's batch source as raw events and re-aggregates it
(and cannot do time windows). In driftloop the batch source of a stream feature view is the Delta table
the streams engine appends the view's computed rows to (and a batch view's source holds its rows as
they are), so materializing means: the newest row per entity in the range (event time, then created),
pulled with the offline store's ``pull_latest_from_table_or_query`` and written with the online store's
``online_write_batch``. Select it in ``feature_store.yaml``::

    batch_engine:
      type: driftloop.features.materialize.PrecomputedRowsEngine

Rows are written **without a created time**: with driftloop's monotonic online stores
(``features/online_stores.py``) a materialized row fills an empty entity or replaces an older value, but
never a newer one nor the stream's value at the same event time (which covers events consumed after the
offline row's own event). So ``feast materialize``/``materialize-incremental`` on a running stack never
makes an online value staler or less correct.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
from feast import Entity, FeatureView
from feast.infra.common.materialization_job import (
    MaterializationJob,
    MaterializationJobStatus,
    MaterializationTask,
)
from feast.infra.compute_engines.base import ComputeEngine
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import FeastConfigBaseModel

from driftloop.features.online_stores import feast_rows

log = logging.getLogger(__name__)
CHUNK = 10_000  # rows per online write


class PrecomputedRowsEngineConfig(FeastConfigBaseModel):
    """``batch_engine`` section of ``feature_store.yaml``."""

    type: Literal["driftloop.features.materialize.PrecomputedRowsEngine"] = (
        "driftloop.features.materialize.PrecomputedRowsEngine")


class PrecomputedJob(MaterializationJob):
    """A finished materialization of one view (this engine runs synchronously)."""

    def __init__(self, task: MaterializationTask, error: BaseException | None = None, rows: int = 0):
        self.task, self._error, self.rows = task, error, rows

    def status(self) -> MaterializationJobStatus:
        return MaterializationJobStatus.ERROR if self._error else MaterializationJobStatus.SUCCEEDED

    def error(self) -> BaseException | None:
        return self._error

    def should_be_retried(self) -> bool:
        return False

    def job_id(self) -> str:
        return f"{self.task.feature_view.name}-{self.task.start_time}-{self.task.end_time}"

    def url(self) -> str | None:
        return None


class PrecomputedRowsEngine(ComputeEngine):
    """Materialization as: newest offline row per entity in the range → the (monotonic) online store."""

    def update(self, project: str, views_to_delete: Sequence[Any], views_to_keep: Sequence[Any],
               entities_to_delete: Sequence[Entity], entities_to_keep: Sequence[Entity]) -> None:
        """Nothing to provision."""

    def teardown_infra(self, project: str, fvs: Sequence[Any], entities: Sequence[Entity]) -> None:
        """Nothing to tear down."""

    def materialize(self, registry: BaseRegistry, tasks: MaterializationTask | list[MaterializationTask],
                    **kwargs: Any) -> list[MaterializationJob]:
        tasks = [tasks] if isinstance(tasks, MaterializationTask) else tasks
        jobs: list[MaterializationJob] = []
        for task in tasks:
            try:
                jobs.append(PrecomputedJob(task, rows=self.materialize_view(task)))
            except Exception as e:  # Feast reports a failed job through its status, as its engines do
                jobs.append(PrecomputedJob(task, error=e))
        return jobs

    def materialize_view(self, task: MaterializationTask) -> int:
        """Write the newest row per entity of ``task``'s range online; the number of rows offered."""
        fv: FeatureView = task.feature_view
        src = fv.batch_source
        to_feature = dict(src.field_mapping or {})  # source column → feature / key name
        to_column = {v: k for k, v in to_feature.items()}
        keys = [c.name for c in fv.entity_columns]
        feats = [f.name for f in fv.features if f.name not in keys]  # a stream view's may repeat its keys
        table: pa.Table = self.offline_store.pull_latest_from_table_or_query(
            config=self.repo_config, data_source=src, join_key_columns=[to_column.get(k, k) for k in keys],
            feature_name_columns=[to_column.get(f, f) for f in feats], timestamp_field=src.timestamp_field,
            created_timestamp_column=src.created_timestamp_column or None, start_date=task.start_time,
            end_date=task.end_time).to_arrow()
        columns = {to_feature.get(c, c): table.column(c).to_pylist() for c in table.column_names}
        ts = table.column(src.timestamp_field).cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist()
        rows = feast_rows(fv, columns, ts, None)
        bar = task.tqdm_builder(len(rows)) if task.tqdm_builder else None
        for i in range(0, len(rows), CHUNK):
            self.online_store.online_write_batch(self.repo_config, fv, rows[i:i + CHUNK],
                                                 progress=bar.update if bar else None)
        if bar:
            bar.close()
        log.info("materialized %s: %d entities offered to the online store", fv.name, len(rows))
        return len(rows)
