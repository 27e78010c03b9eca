"""``driftloop bench online``: online feature read latency for 1 and 100 entities.

Fills the online store (sqlite by default, Redis when ``DRIFTLOOP_REDIS_URL`` is set) with the views of
the ads example's ``ctr`` model for N users, then times two read paths, each ``reads`` times per size on
random users:

* ``serving``: what the serving worker does per batch (the ``OnlineReader`` of the model's vectorizer:
  the store's ``read_matrix``, one sqlite query or one Redis pipeline, straight into a float matrix);
* ``feast``: Feast's public ``get_online_features`` of the same view features.

The headline ``p99_1_ms``/``p99_100_ms`` are the serving path's.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from feast.infra.online_stores.helpers import get_online_store_from_config

from driftloop.core.settings import Settings
from driftloop.features.repo import apply, init_repo
from driftloop.features.vectors import Vectorizer

SIZES = (1, 100)


def _fill(store, users: int, rng: np.random.Generator) -> None:
    now = pd.Timestamp(datetime.now(UTC))
    ids = [f"u{i}" for i in range(users)]
    base = {"user_id": ids, "event_timestamp": [now] * users, "created": [now] * users}
    store.write_to_online_store("user_impressions", pd.DataFrame(
        base | {"impressions_1m": rng.integers(0, 50, users), "mean_bid_1m": rng.random(users) * 3}))
    store.write_to_online_store("user_clicks", pd.DataFrame(base | {"clicks_5m": rng.integers(0, 5, users)}))


def _percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def run(base: Settings, users: int = 10_000, reads: int = 2000, seed: int = 1) -> dict[str, object]:
    root = base.root / "bench" / f"online-{uuid.uuid4().hex[:6]}"
    init_repo(root / "repo", "ads")
    s = Settings(**{**base.model_dump(), "data_dir": root, "repo": root / "repo"})
    rng = np.random.default_rng(seed)
    store, _plan, decls = apply(s)
    t = time.perf_counter()
    _fill(store, users, rng)
    kind = type(get_online_store_from_config(store.config.online_store)).__name__
    print(f"online store {kind}: {users:,} users × 2 views written in "
          f"{time.perf_counter() - t:.1f} s")
    reader = Vectorizer(store, decls.models["ctr"]).reader
    refs = [f"{view}:{feature}" for view, feature in reader.columns]
    paths = {
        "serving": reader.matrix,
        "feast": lambda ids: store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in ids]),
    }
    out: dict[str, object] = {"store": kind, "users": users, "reads": reads}
    for name, read in paths.items():
        for n in SIZES:
            batches = [[f"u{i}" for i in rng.choice(users, n, replace=False)] for _ in range(reads)]
            for ids in batches[:50]:  # warm-up
                read(ids)
            ms = []
            for ids in batches:
                t0 = time.perf_counter()
                read(ids)
                ms.append((time.perf_counter() - t0) * 1e3)
            p50, p99 = _percentiles(ms)
            target = 2.0 if n == 1 else 10.0
            print(f"{name:<8} {n:>3} entit{'y' if n == 1 else 'ies'}: p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  "
                  f"(target p99 ≤ {target:g} ms: {'met' if p99 <= target else 'missed'}, ratio {target / p99:.2f})")
            prefix = "" if name == "serving" else "feast_"
            out[f"{prefix}p50_{n}_ms"] = round(p50, 3)
            out[f"{prefix}p99_{n}_ms"] = round(p99, 3)
    print(json.dumps(out))
    return out
