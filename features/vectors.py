"""A model's input vectors, built from its Feast ``FeatureService``.

Serving: :class:`Vectorizer` reads the service's stored views online for each event's entity
(``features/online_read.py``) and computes its on-demand views from the event's request fields (and
the view features they read) through Feast's public on-demand API, so an on-demand feature is computed
by the same user function Feast runs. Training: ``core.frames.to_matrix`` turns a training frame into
the same column order. Missing values are 0 in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureStore, OnDemandFeatureView
from feast.type_map import feast_value_type_to_pa

from driftloop.core.declarations import ModelSpec
from driftloop.features.online_read import OnlineReader, service_reads, stored

KEY_TYPES = {"string": pa.string(), "int": pa.int64()}


@dataclass
class _OnDemand:
    """One on-demand view of the service: where its inputs come from and where its outputs go."""

    view: OnDemandFeatureView
    request: dict[str, pa.DataType]  # request field -> type the view declares
    inputs: list[tuple[int, str, pa.DataType]]  # (reader column, feature name, type) of the view features it reads
    outputs: list[tuple[str, int]]  # (feature, output column)

    def compute(self, events: Sequence[dict[str, Any]], key: str, keys: pa.Array, online: np.ndarray,
                out: np.ndarray) -> None:
        cols: dict[str, pa.Array] = {key: keys}
        for name, typ in self.request.items():
            cols[name] = pa.array([ev[name] for ev in events]).cast(typ)
        for j, name, typ in self.inputs:
            col = online[:, j]
            missing = np.isnan(col)
            cols[name] = pa.array(np.where(missing, 0.0, col), mask=missing).cast(typ, safe=False)
        table = pa.table(cols)
        if self.view.mode == "python":
            if self.view.singleton:
                rows = table.to_pylist()
                res = [self.view.transform_dict({k: [v] for k, v in r.items()}) for r in rows]
                got: Any = {f: [r[f] for r in res] for f, _ in self.outputs}
            else:
                got = self.view.transform_dict(table.to_pydict())
            for f, c in self.outputs:
                out[:, c] = np.asarray(got[f], dtype=np.float64)
        elif self.view.mode == "pandas":  # the user's function on the frame Feast's transform_arrow would build,
            frame = self.view.feature_transformation.transform(table.to_pandas(use_threads=False))  # sans arrow trip
            for f, c in self.outputs:
                out[:, c] = pd.to_numeric(frame[f]).to_numpy(np.float64, na_value=np.nan)
        else:
            got = self.view.transform_arrow(table)
            for f, c in self.outputs:
                out[:, c] = pc.cast(got[f], pa.float64()).to_numpy(zero_copy_only=False)


class Vectorizer:
    """Feature vectors of one model: ``matrix(events)`` has one float32 row per event, ``spec.features`` in order."""

    def __init__(self, store: FeatureStore, spec: ModelSpec):
        self.spec = spec
        self.reader = OnlineReader(store, spec.feature_service, spec.key, spec.key_type)
        views, _ = service_reads(store, spec.feature_service)
        col = {f: c for c, f in enumerate(spec.features)}
        self.online_out: list[int] = []  # output columns read online
        self.online_in: list[int] = []  # ... and their reader columns
        self.on_demand: list[_OnDemand] = []
        found: list[str] = []
        for p in store.get_feature_service(spec.feature_service, allow_cache=True).feature_view_projections:
            view, names = views[p.name], [f.name for f in p.features if f.name in col]
            found += names
            if stored(view):
                self.online_out += [col[n] for n in names]
                self.online_in += [self.reader.index[(p.name, n)] for n in names]
                continue
            inputs = [(self.reader.index[(src.name, f.name)], f.name, feast_value_type_to_pa(f.dtype.to_value_type()))
                      for src in view.source_feature_view_projections.values() for f in src.features]
            request = {n: feast_value_type_to_pa(vt) for n, vt in view.get_request_data_schema().items()}
            self.on_demand.append(_OnDemand(view, request, inputs, [(n, col[n]) for n in names]))
        if sorted(found) != sorted(spec.features):
            raise ValueError(f"model {spec.name}: feature service {spec.feature_service!r} in the registry serves "
                             f"{found}, the declarations {spec.features}: apply the repo again")

    def matrix(self, events: Sequence[dict[str, Any]]) -> np.ndarray:
        """The model's input matrix for validated events (each holds the key and the request fields)."""
        keys = [ev[self.spec.key] for ev in events]
        online = self.reader.matrix(keys, missing=np.nan)
        out = np.zeros((len(events), len(self.spec.features)), np.float64)
        out[:, self.online_out] = online[:, self.online_in]
        if events:
            key_array = pa.array(keys, KEY_TYPES[self.spec.key_type])
            for od in self.on_demand:
                od.compute(events, self.spec.key, key_array, online, out)
        out[np.isnan(out)] = 0.0
        return out.astype(np.float32)
