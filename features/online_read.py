"""Online values of the stored views a feature service reads, for many entities, straight into a float matrix.

Serving reads a batch's entities once per batch. With driftloop's online stores (``features/online_stores.py``)
the reader serialises each entity key once (cached across batches) and calls the store's public
``read_matrix``: one query (sqlite) or one pipeline (Redis) over every view, returning float64 values with no
proto decoding. Any other Feast online store is read through its public ``online_read``, one call per view.

The views read are the service's stored views (batch ``FeatureView``, ``StreamFeatureView``, and
on-demand views written to the online store) plus the views its on-demand views read; the on-demand
transformations themselves are computed by ``features/vectors.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from feast import FeatureStore, OnDemandFeatureView, ValueType
from feast.infra.online_stores.helpers import get_online_store_from_config
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value

from driftloop.features.online_stores import MonotonicOnlineStore, key_bytes
from driftloop.features.value_encoding import NUMERIC

log = logging.getLogger(__name__)

# entity key value type -> (field of the Value proto, how an event's key becomes that value)
KEY_VALUES: dict[ValueType, tuple[str, type]] = {
    ValueType.STRING: ("string_val", str), ValueType.INT64: ("int64_val", int), ValueType.INT32: ("int32_val", int)}
KEY_CACHE = 200_000  # serialised entity keys kept between batches
NUMERIC_TYPES = {ValueType.INT64, ValueType.INT32, ValueType.DOUBLE, ValueType.FLOAT, ValueType.BOOL}


def stored(view: Any) -> bool:
    """Whether a view's values are read from the online store (an on-demand view only when written there)."""
    return not isinstance(view, OnDemandFeatureView) or bool(view.write_to_online_store)


def service_reads(store: FeatureStore, service: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Every view of the registry by name, and the stored views (→ feature names, in order) ``service`` reads:
    its own stored views' projected features and the source features of its on-demand views."""
    views = {v.name: v for v in store.list_all_feature_views(allow_cache=True)}
    wanted: dict[str, list[str]] = {}

    def want(view: str, names: Sequence[str]) -> None:
        have = wanted.setdefault(view, [])
        have += [n for n in names if n not in have]

    for p in store.get_feature_service(service, allow_cache=True).feature_view_projections:
        view = views.get(p.name)
        if view is None:
            raise KeyError(f"feature service {service!r} uses view {p.name!r}, which the registry lacks")
        if stored(view):
            want(p.name, [f.name for f in p.features])
        else:
            for src in view.source_feature_view_projections.values():
                want(src.name, [f.name for f in src.features])
    return views, wanted


class OnlineReader:
    """Reads ``columns`` — (view, feature) pairs — of one feature service's stored views for entities of
    its one join key (``key_type`` "string" or "int": how event keys are converted)."""

    def __init__(self, store: FeatureStore, service: str, join_key: str, key_type: str = "string"):
        self.store = store
        self.config = store.config
        self.online = get_online_store_from_config(store.config.online_store)
        self.fast = isinstance(self.online, MonotonicOnlineStore)  # False: the generic path (any store)
        self.join_key = join_key
        self.key_type = key_type
        views, wanted = service_reads(store, service)
        self.views = [(views[v], names) for v, names in wanted.items()]
        self.columns: list[tuple[str, str]] = [(fv.name, n) for fv, names in self.views for n in names]
        self.index = {c: j for j, c in enumerate(self.columns)}
        self.view_types = [self._key_value_type(fv) for fv, _ in self.views]
        kinds = {(fv.name, f.name): f.dtype.to_value_type() for fv, _ in self.views for f in fv.features}
        other = [f"{v}:{n}" for v, n in self.columns if kinds.get((v, n)) not in NUMERIC_TYPES]
        if other:
            log.warning("%s: features %s are not numbers; they read as missing", service, other)
        # views by entity key type (one group unless views declare the key with different integer widths)
        self.groups: dict[ValueType, tuple[list[tuple[Any, list[str]]], np.ndarray]] = {}
        for vt in dict.fromkeys(self.view_types):
            members = [v for v, t in zip(self.views, self.view_types, strict=True) if t == vt]
            cols = [self.index[(fv.name, n)] for fv, names in members for n in names]
            self.groups[vt] = (members, np.asarray(cols, np.intp))
        self._key_cache: dict[ValueType, dict[Any, bytes]] = {}  # per key type: entity -> serialised key

    def _key_value_type(self, view: Any) -> ValueType:
        cols = [c for c in view.entity_columns if c.name == self.join_key]
        vt = cols[0].dtype.to_value_type() if cols else None
        if vt not in KEY_VALUES:
            raise ValueError(f"view {view.name!r}: entity key {self.join_key!r} must be a string or integer "
                             f"column (found {[(c.name, str(c.dtype)) for c in view.entity_columns]})")
        return vt

    def _keys(self, uniq: list[Any], vt: ValueType) -> list[EntityKey]:
        field, cast = KEY_VALUES[vt]
        return [EntityKey(join_keys=[self.join_key], entity_values=[Value(**{field: cast(u)})]) for u in uniq]

    def matrix(self, entities: Sequence[Any], missing: float = 0.0) -> np.ndarray:
        """One float64 row per entity (repeats allowed), one column per ``columns`` entry; values that are
        not stored (or not numbers) are ``missing``."""
        codes, found = pd.factorize(np.asarray(entities, dtype=object), use_na_sentinel=False)  # in first-seen order
        uniq = found.tolist()
        table = np.full((len(uniq), len(self.columns)), np.nan)
        if uniq and self.columns:
            if self.fast:
                self._read_fast(uniq, table)
            else:
                self._read_views(uniq, table)
        if not np.isnan(missing):
            table[np.isnan(table)] = missing
        return table[codes]

    def _read_fast(self, uniq: list[Any], table: np.ndarray) -> None:
        for vt, (members, cols) in self.groups.items():
            table[:, cols] = self.online.read_matrix(self.config, members, self._key_bytes(uniq, vt))

    def _read_views(self, uniq: list[Any], table: np.ndarray) -> None:
        keys = {vt: self._keys(uniq, vt) for vt in self.groups}
        for (fv, names), vt in zip(self.views, self.view_types, strict=True):
            col = {n: self.index[(fv.name, n)] for n in names}
            for i, (_ts, values) in enumerate(self.online.online_read(self.config, fv, keys[vt], names)):
                for name, v in (values or {}).items():
                    if name in col:
                        _put(table, i, col[name], v)

    def _key_bytes(self, uniq: list[Any], vt: ValueType) -> list[bytes]:
        """The stores' serialised entity keys (cached: the same entities come back batch after batch)."""
        cache = self._key_cache.setdefault(vt, {})
        missing = [u for u in uniq if u not in cache]
        if missing:
            if len(cache) > KEY_CACHE:
                cache.clear()
            for u, k in zip(missing, self._keys(missing, vt), strict=True):
                cache[u] = key_bytes(self.config, k)
        return list(map(cache.__getitem__, uniq))


def _put(table: np.ndarray, i: int, j: int, v: Value) -> None:
    kind = v.WhichOneof("val")
    if kind in NUMERIC:
        table[i, j] = getattr(v, kind)
