"""Online feature values of a feature service for many entities, straight into a float matrix.

Serving reads a batch's users once per batch. Through Feast's provider ``online_read`` that costs, per
view, a serialisation of every entity key, a timestamp conversion per stored value and a response
built per entity. On Feast's sqlite store this reader instead serialises each key once per batch and
runs one ``SELECT entity_key, feature_name, value`` over every view's table (Feast's own layout, read
only). Any other online store (Redis, Postgres) goes through the provider's ``online_read``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from feast import FeatureStore
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value


class OnlineReader:
    def __init__(self, store: FeatureStore, service: str, columns: Sequence[str], join_key: str):
        """``columns``: the output order of the service's features (by feature name)."""
        self.store = store
        self.provider = store._get_provider()
        self.join_key = join_key
        svc = store.get_feature_service(service)
        by_name = {v.name: v for v in [*store.list_feature_views(), *store.list_stream_feature_views()]}
        self.views = [(by_name[p.name], [f.name for f in p.features]) for p in svc.feature_view_projections]
        self.column = {n: list(columns).index(n) for _, names in self.views for n in names}
        self.width = len(columns)
        online = self.provider.online_store
        self.sqlite = online if isinstance(online, SqliteOnlineStore) else None
        if self.sqlite is not None:
            cfg = store.config
            versioned = cfg.registry.enable_online_feature_view_versioning
            self.tables = [(_quote_id(_table_id(cfg.project, fv, versioned)), names) for fv, names in self.views]

    def matrix(self, entities: Sequence[str]) -> np.ndarray:
        """One row per entity (repeats allowed), one column per feature; missing values are 0."""
        uniq = list(dict.fromkeys(entities))
        table = np.zeros((len(uniq), self.width), np.float32)
        keys = [EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=u)]) for u in uniq]
        if self.sqlite is not None:
            self._sqlite(keys, table)
        else:
            for fv, names in self.views:
                for i, (_ts, values) in enumerate(self.provider.online_read(self.store.config, fv, keys, names)):
                    for name, v in (values or {}).items():
                        self._put(table, i, name, v)
        pos = {u: i for i, u in enumerate(uniq)}
        return table[[pos[u] for u in entities]]

    def _put(self, table: np.ndarray, i: int, name: str, v: Value) -> None:
        kind = v.WhichOneof("val")
        if kind is not None and name in self.column:
            table[i, self.column[name]] = getattr(v, kind)

    def _sqlite(self, keys: list[EntityKey], table: np.ndarray) -> None:
        version = self.store.config.entity_key_serialization_version
        blobs = [serialize_entity_key(k, entity_key_serialization_version=version) for k in keys]
        row = {b: i for i, b in enumerate(blobs)}
        marks = ",".join("?" * len(blobs))
        sql = " UNION ALL ".join(f"SELECT entity_key, feature_name, value FROM {t} WHERE entity_key IN ({marks})"
                                 for t, _ in self.tables)
        conn = self.sqlite._get_conn(self.store.config)
        v = Value()
        for key, name, blob in conn.execute(sql, blobs * len(self.tables)).fetchall():
            if name in self.column:
                v.ParseFromString(blob)
                self._put(table, row[key], name, v)
