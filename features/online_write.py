"""Writes to the Feast online store that never move an entity's value back in time.

Used by the streams worker (each micro-batch) and by ``driftloop backfill --materialize``. With driftloop's
own online stores (``features/online_stores.py``, what ``feature_store.yaml`` selects) the store decides,
atomically per row, by the ``(event_ts, created_ts)`` rule: a stream row replaces the stored one at the same
or an older event time; a backfill row (``replace_same_instant=False``) is written without a created time,
so it loses every tie at the same event time to a stream row and only fills an empty entity or replaces an
older value. With any other Feast online store (a hand-edited ``feature_store.yaml``) the sink reads the
stored event times first and drops older rows: the same rule, but not atomic against a concurrent writer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from feast import FeatureStore, FeatureView
from feast.infra.online_stores.helpers import get_online_store_from_config

from driftloop.core.metrics import FRESHNESS, ROWS_WRITTEN
from driftloop.features.online_stores import MonotonicOnlineStore, Row, feast_rows, to_us

log = logging.getLogger(__name__)


class OnlineSink:
    """Writes one row per entity and view to the online store, never replacing a newer row with an older one."""

    def __init__(self, store: FeatureStore):
        self.store = store
        self.config = store.config
        self.online = get_online_store_from_config(store.config.online_store)
        self.views: dict[str, FeatureView] = {}
        if not isinstance(self.online, MonotonicOnlineStore):
            log.warning("online store %s is not one of driftloop's: writes check stored times first, which a "
                        "concurrent writer can race (select driftloop.features.online_stores.Monotonic*OnlineStore"
                        " in feature_store.yaml)", type(self.online).__name__)

    def write(self, view: str, rows: list[dict[str, Any]], replace_same_instant: bool = True) -> int:
        """Write rows (entity, features, ``event_timestamp``/``created`` in µs) unless the stored row of their
        entity is newer; returns how many were stored.

        ``replace_same_instant``: a row at the stored event time with a later ``created`` replaces it (the
        stream's late-event correction). A backfill passes False: its rows are written without a created
        time, as its value at that time may lack events the stream had consumed."""
        if not rows:
            return 0
        fv = self.views.get(view)
        if fv is None:
            fv = self.views[view] = self.store.get_stream_feature_view(view, allow_registry_cache=True)
        columns = {c: [r.get(c) for r in rows] for c in rows[0]}
        event_us = columns["event_timestamp"]
        created_us = columns["created"] if replace_same_instant else None
        if isinstance(self.online, MonotonicOnlineStore):
            stored = self.online.write_columns(self.config, fv, columns, event_us, created_us)
            times = [event_us[i] for i in stored]
        else:
            data = feast_rows(fv, columns, event_us, created_us)
            fresh = self._newer(fv, data, replace_same_instant)
            if fresh:
                self.online.online_write_batch(self.config, fv, fresh, progress=None)
            times = [to_us(ts) for _k, _v, ts, _c in fresh]
        now_us, observe = time.time() * 1e6, FRESHNESS.labels(view=view).observe
        for t in times:
            observe(max(0.0, (now_us - t) / 1e6))
        n, offered = len(times), len(set(zip(*(columns[c.name] for c in fv.entity_columns), strict=True)))
        ROWS_WRITTEN.labels(sink=f"online:{view}").inc(n)
        if n < offered:
            log.info("online %s: kept %d stored rows that are newer", view, offered - n)
        return n

    def _newer(self, fv: FeatureView, data: list[Row], replace_same_instant: bool) -> list[Row]:
        """The rows newer than the stored ones, read first (any Feast online store; not atomic)."""
        stored = self.online.online_read(self.config, fv, [d[0] for d in data])
        return [d for d, (ts, _) in zip(data, stored, strict=True)
                if ts is None or to_us(d[2]) > to_us(ts) or (replace_same_instant and to_us(d[2]) == to_us(ts))]
