"""Feast's Redis online store and SQL registry on PostgreSQL, selected by settings alone: the streams worker
writes online values to Redis that equal the reference, serving's read path reads them, and the registry
lives in PostgreSQL. Skipped, with the reason, where the servers are not installed."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from driftloop.app.producer import publish
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import apply, open_store
from driftloop.features.vectors import Vectorizer
from driftloop.features.windows import specs_from_feast
from tests.helpers import valid, wait_streamed, worker
from tests.reference import assert_frames_match, expected
from tests.servers import postgres_server, redis_server
from tests.test_online_read import feast_matrix


@pytest.fixture(scope="module")
def redis_url():
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def registry_url():
    with postgres_server() as url:
        yield url


def test_settings_select_redis_and_postgres(tmp_path, bootstrap_servers, redis_url, registry_url):
    s = Settings(data_dir=tmp_path, bootstrap_servers=bootstrap_servers, topic_prefix=f"so{uuid.uuid4().hex[:8]}.",
                 partitions=2, redis_url=redis_url, registry_url=registry_url)
    ensure_topics(s)
    store, _, decls = apply(s)
    yaml = (s.feature_repo_dir / "feature_store.yaml").read_text()
    assert "type: driftloop.features.online_stores.MonotonicRedisOnlineStore" in yaml and "registry_type: sql" in yaml
    views = specs_from_feast(store.list_stream_feature_views())
    events = synthetic_events(6000, users=300, rate=300, disorder_s=2.0, seed=31)
    with worker(s, "streams"):
        publish(s, events)
        wait_streamed(s, events, views, 180)
    # a fresh handle, as another process would open it: registry from PostgreSQL, values from Redis
    store = open_store(s)
    assert {v.name for v in store.list_stream_feature_views()} == {v.name for v in views}
    for v in views:
        _off, want = expected(valid(events, v.topic), v)
        names = [a.name for a in v.aggs]
        got = store.get_online_features(features=[f"{v.name}:{n}" for n in names],
                                        entity_rows=[{v.entity_key: e} for e in want[v.entity_key]]).to_df()
        assert_frames_match(got, want, v.entity_key, names)
    # serving's reader (one pipeline per batch on driftloop's Redis store) agrees with Feast
    spec = decls.models["ctr"]
    vec = Vectorizer(store, spec)
    users = sorted({r["user_id"] for r in valid(events, "events.impressions")})[:50] + ["nobody"]
    rows = [{"user_id": u, "position": 1, "bid": 1.0, "device": "mobile"} for u in users]
    assert vec.reader.fast and np.array_equal(vec.matrix(rows), feast_matrix(store, spec, rows))
    vec.reader.fast = False  # the public online_read path agrees too
    assert np.array_equal(vec.matrix(rows), feast_matrix(store, spec, rows))
    import redis

    host, port = redis_url.split(":")
    assert redis.Redis(host=host, port=int(port)).dbsize() >= len({r["user_id"] for r in valid(events,
                                                                                               "events.impressions")})
