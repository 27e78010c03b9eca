"""Two producers on the same entities, one whose clock runs 10 minutes ahead, through the real broker and a real
streams worker: the skewed events are dead-lettered ``future`` and must not move the watermark, so none of the
on-time events is dead-lettered ``late``, and features and labels equal the reference on the on-time events."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import orjson
import pandas as pd

from driftloop.app.producer import publish
from driftloop.core import delta
from driftloop.core.contracts import now_us
from driftloop.core.declarations import bronze_table
from driftloop.core.settings import Settings
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.windows import specs_from_feast
from tests.helpers import apply_repo, read_topic, valid, wait_committed, worker
from tests.test_streams_exact import check_exact

SKEW_US = 600_000_000  # the second producer's clock: 10 minutes ahead
S = 1_000_000


def test_a_producer_ahead_of_the_clock_dead_letters_only_its_own_events(settings: Settings):
    store, decls = apply_repo(settings)
    views = specs_from_feast(store.list_stream_feature_views())
    with worker(settings, "streams") as proc:
        now = now_us()
        # on time: 20 s of traffic ending 10 s ago (up to 2 s out of order), then a click per user of the
        # first 50 (on every partition) stamped now, which moves the clicks' watermark past every label window
        on_time = synthetic_events(4000, users=200, rate=200, disorder_s=2.0, seed=41, start_us=now - 30 * S)
        on_time += [("events.clicks", {"schema_version": 1, "event_id": f"end-{u}", "ts": now - S + u,
                                       "user_id": f"u{u}", "impression_id": "none", "ad_id": "a0"})
                    for u in range(50)]
        skewed = synthetic_events(500, users=200, rate=200, disorder_s=2.0, seed=42, start_us=now + SKEW_US)
        # two producers at once, so the skewed events land between on-time ones on every partition
        with ThreadPoolExecutor(2) as pool:
            sent = [pool.submit(publish, settings, on_time[:-50], rate=2000),
                    pool.submit(publish, settings, skewed, rate=len(skewed) / 2.0)]
            assert sum(f.result() for f in sent) == len(on_time) - 50 + len(skewed)
        publish(settings, on_time[-50:])
        wait_committed(settings, f"{settings.topic_prefix}streams", ["events.impressions", "events.clicks"],
                       alive=proc)

    dead = read_topic(settings, "dlq", 10**6, timeout=5)
    reasons = pd.Series([dict(m.headers())["reason"].decode() for m in dead]).value_counts().to_dict()
    assert reasons == {"future": len(skewed)}, reasons  # nothing on time is late, every skewed event refused
    assert {orjson.loads(m.value())["event_id"] for m in dead} == {r["event_id"] for _, r in skewed}
    detail = dict(dead[0].headers())["error"].decode()
    ts = orjson.loads(dead[0].value())["ts"]
    assert f"ts {ts} " in detail and f"{settings.max_future_s:g}s ahead of the clock" in detail, detail

    for topic in ("events.impressions", "events.clicks"):
        ids = delta.read(settings.offline_dir / bronze_table(topic), ["event_id"])["event_id"]
        assert sorted(ids) == sorted(r["event_id"] for r in valid(on_time, topic)), topic
    check_exact(settings, store, on_time, views, decls=decls)
