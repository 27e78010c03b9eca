"""Measured online/offline consistency, per view and feature.

* ``offline``: each stream-written offline row against the Spark recompute of the same event (joined on
  the source ``_topic``/``_partition``/``_offset``); a row missing on either side is a mismatch.
* ``online``: each entity's online value against the recompute at its newest event over every event
  consumed (the value the stream leaves online once it has caught up).

Values match when equal, both null, or within 1e-9 relative (sums differ only by addition order).
The shares go to stdout and to the gauge ``driftloop_consistency_mismatch_share``, written as a
Prometheus textfile (``<data_dir>/metrics/consistency.prom``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import pandas as pd
from prometheus_client import write_to_textfile

from driftloop.core import delta
from driftloop.core.metrics import CONSISTENCY, JOBS
from driftloop.core.settings import Settings
from driftloop.features.backfill import US, compute, spark_session, view_spec
from driftloop.features.repo import open_store
from driftloop.features.windows import ViewSpec

log = logging.getLogger(__name__)

KEY = ["_topic", "_partition", "_offset"]
ONLINE_BATCH = 1000


@dataclass
class Mismatch:
    view: str
    feature: str
    check: str  # offline | online
    rows: int
    mismatched: int

    @property
    def share(self) -> float:
        return self.mismatched / self.rows if self.rows else 0.0


def differ(a: pd.Series, b: pd.Series) -> np.ndarray:
    """Per row: the values differ (one null and not the other, or beyond 1e-9 relative)."""
    x = pd.to_numeric(a, errors="coerce").to_numpy(float)
    y = pd.to_numeric(b, errors="coerce").to_numpy(float)
    nx, ny = np.isnan(x), np.isnan(y)
    close = np.isclose(x, y, rtol=1e-9, atol=1e-12)
    return (nx != ny) | (~nx & ~ny & ~close)


def _offline(spark, s: Settings, view: ViewSpec, start_us: int | None, end_us: int | None) -> list[Mismatch]:
    want = compute(spark, s, view, start_us, end_us).toPandas()
    got = delta.read(s.offline_dir / view.name, [*KEY, "event_timestamp", *(a.name for a in view.aggs)])
    ts = pd.to_datetime(got["event_timestamp"], utc=True).astype("int64") // 1000 \
        if len(got) else pd.Series([], dtype="int64")
    keep = np.ones(len(got), bool)
    if start_us is not None:
        keep &= (ts >= start_us).to_numpy()
    if end_us is not None:
        keep &= (ts < end_us).to_numpy()
    got = got[keep].drop_duplicates(KEY, keep="last")
    m = want.merge(got, on=KEY, how="outer", suffixes=("_want", "_got"), indicator=True)
    missing = (m["_merge"] != "both").to_numpy()
    return [Mismatch(view.name, a.name, "offline", len(m),
                     int((missing | differ(m[f"{a.name}_want"], m[f"{a.name}_got"])).sum())) for a in view.aggs]


def _online(spark, s: Settings, view: ViewSpec, start_us: int | None) -> list[Mismatch]:
    want = compute(spark, s, view, start_us, latest=True).toPandas()
    if start_us is not None:
        want = want[want["ts"] >= start_us]
    store = open_store(s)
    names = [a.name for a in view.aggs]
    parts = []
    keys = want[view.entity_key].tolist()
    for i in range(0, len(keys), ONLINE_BATCH):
        parts.append(store.get_online_features(features=[f"{view.name}:{n}" for n in names],
                                               entity_rows=[{view.entity_key: k} for k in keys[i:i + ONLINE_BATCH]])
                     .to_df())
    got = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[view.entity_key, *names])
    m = want.merge(got, on=view.entity_key, how="left", suffixes=("_want", "_got"))
    return [Mismatch(view.name, n, "online", len(m), int(differ(m[f"{n}_want"], m[f"{n}_got"]).sum()))
            for n in names]


def consistency(settings: Settings, views: list[str] | None = None, start: datetime | None = None,
                end: datetime | None = None, online: bool = True) -> list[Mismatch]:
    """Mismatch counts per view, feature and check (see the module docstring)."""
    names = views or [v.name for v in open_store(settings).list_stream_feature_views() if v.udf is None]
    start_us = int(start.timestamp() * US) if start else None
    end_us = int(end.timestamp() * US) if end else None
    out: list[Mismatch] = []
    with spark_session(settings) as spark:
        for name in names:
            view = view_spec(settings, name)
            out += _offline(spark, settings, view, start_us, end_us)
            if online:
                out += _online(spark, settings, view, start_us)
    for r in out:
        CONSISTENCY.labels(view=r.view, feature=r.feature, check=r.check).set(r.share)
    path = settings.root / "metrics" / "consistency.prom"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), JOBS)
    log.info("consistency gauges written to %s", path)
    return out


def report(rows: list[Mismatch]) -> str:
    lines = [f"{'view':<22}{'feature':<18}{'check':<9}{'rows':>10}{'mismatched':>12}{'share':>10}"]
    lines += [f"{r.view:<22}{r.feature:<18}{r.check:<9}{r.rows:>10}{r.mismatched:>12}{r.share:>10.4%}" for r in rows]
    return "\n".join(lines)


def as_json(rows: list[Mismatch]) -> dict[str, object]:
    total = sum(r.mismatched for r in rows)
    return {"mismatched": total, "max_share": max((r.share for r in rows), default=0.0),
            "checks": [asdict(r) | {"share": r.share} for r in rows]}
