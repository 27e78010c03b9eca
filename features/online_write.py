"""Writes to the Feast online store that never move an entity's value back in time.

Used by the streams worker (each micro-batch) and by ``driftloop backfill --materialize`` (which must
not replace a newer streamed value with an older recomputed one).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from feast import FeatureStore
from feast.infra.online_stores.helpers import _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore

from driftloop.core.metrics import FRESHNESS, ROWS_WRITTEN

log = logging.getLogger(__name__)


class OnlineSink:
    """Writes one row per entity to the Feast online store, never replacing a newer row with an older one.

    Feast's stores overwrite unconditionally, so the sink reads the stored event times of the batch's
    entities first (one read per view and flush) and drops rows older than what is stored.
    """

    def __init__(self, store: FeatureStore):
        self.store = store
        self.provider = store._get_provider()
        self.views: dict[str, Any] = {}

    def write(self, view: str, rows: list[dict[str, Any]], replace_same_instant: bool = True) -> int:
        """Write rows (entity, features, ``event_timestamp``/``created`` in µs) not older than the stored ones.

        ``replace_same_instant``: a row at the stored event time replaces it (the stream's late-event
        correction); a backfill passes False, as its row at that time may lack events the stream had."""
        if not rows:
            return 0
        fv = self.views.get(view)
        if fv is None:
            fv = self.views[view] = self.store.get_stream_feature_view(view, allow_registry_cache=True)
        df = pd.DataFrame(rows)
        df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], unit="us", utc=True)
        df["created"] = pd.to_datetime(df["created"], unit="us", utc=True)
        data = self.provider._prep_rows_to_write_for_ingestion(feature_view=fv, df=df, field_mapping=None)
        stored = self.provider.online_read(self.store.config, fv, [d[0] for d in data])
        fresh = [d for d, (ts, _) in zip(data, stored, strict=True)
                 if ts is None or _utc(d[2]) > _utc(ts) or (replace_same_instant and _utc(d[2]) == _utc(ts))]
        same = [d for d, (ts, _) in zip(data, stored, strict=True) if ts is not None and _utc(d[2]) == _utc(ts)]
        if same and replace_same_instant:
            self._allow_same_instant(view, same)
        if fresh:
            self.provider.online_write_batch(self.store.config, fv, fresh, progress=None)
        now = time.time()
        for d in fresh:
            FRESHNESS.observe(max(0.0, now - _utc(d[2])))
        ROWS_WRITTEN.labels(sink=f"online:{view}").inc(len(fresh))
        if len(fresh) < len(data):
            log.info("online %s: kept %d stored rows that are newer", view, len(data) - len(fresh))
        return len(fresh)


    def _allow_same_instant(self, view: str, rows: list[Any]) -> None:
        """Feast's Redis store skips a row whose event time equals the stored one, but a late event inside
        the lateness changes the value without moving the time: forget the stored time of those entities
        first (a crash in between leaves the old value, and the replayed batch writes it again)."""
        online = self.provider.online_store
        if not isinstance(online, RedisOnlineStore):
            return
        cfg = self.store.config
        version = cfg.entity_key_serialization_version
        client = online._get_client(cfg.online_store)
        with client.pipeline(transaction=False) as pipe:
            for d in rows:
                pipe.hdel(_redis_key(cfg.project, d[0], entity_key_serialization_version=version), f"_ts:{view}")
            pipe.execute()


def _utc(ts: datetime) -> float:
    """Epoch seconds; Feast hands back naive UTC datetimes from some stores."""
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC).timestamp()
    return ts.timestamp()
