"""A Feast batch engine for views whose batch source already holds computed feature rows.

Feast's local engine treats a stream feature view's batch source as raw events and re-aggregates it
(and cannot do time windows). In driftloop the batch source of a stream feature view is the Delta table
the streams engine appends the view's computed rows to, so materializing means: the newest row per
entity in the range, written online. Select it in ``feature_store.yaml``::

    batch_engine:
      type: driftloop.features.materialize.PrecomputedRowsEngine
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.local.compute import LocalComputeEngine, LocalComputeEngineConfig
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.registry.base_registry import BaseRegistry


class PrecomputedRowsEngineConfig(LocalComputeEngineConfig):
    type: Literal["driftloop.features.materialize.PrecomputedRowsEngine"] = (  # type: ignore[assignment]
        "driftloop.features.materialize.PrecomputedRowsEngine")


class _LatestRowsBuilder(LocalFeatureBuilder):
    """Read, filter to the range, keep the newest row per entity (event time, then created): no aggregation."""

    def get_column_info(self, view):
        """The view's feature columns (Feast would read the aggregations' input columns)."""
        info = super().get_column_info(view)
        reverse = {v: k for k, v in (view.batch_source.field_mapping or {}).items()}
        names = [reverse.get(f.name, f.name) for f in view.features if f.name not in info.join_keys]
        return dataclasses.replace(info, feature_cols=names)

    def _should_aggregate(self, view) -> bool:
        return False

    def _should_dedupe(self, view) -> bool:
        return True


class PrecomputedRowsEngine(LocalComputeEngine):
    def _materialize_one(self, registry: BaseRegistry, task: MaterializationTask, **kwargs) -> LocalMaterializationJob:
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        context = self.get_execution_context(registry, task)
        try:
            _LatestRowsBuilder(registry, task, backend=self._get_backend(context)).build().execute(context)
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
        except Exception as e:  # Feast reports a failed job through its status, as the local engine does
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)
