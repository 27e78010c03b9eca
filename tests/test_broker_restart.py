"""The embedded broker keeps its log in memory: a stack started again on the same data directory gets an
empty broker whose offsets begin at 0 again. Its records must still reach the Delta tables, which hold the
idempotency marks of the old log's offsets."""

from __future__ import annotations

from pathlib import Path

from driftloop.app.producer import publish
from driftloop.core import delta
from driftloop.core.broker import EmbeddedBroker
from driftloop.core.settings import Settings
from tests.helpers import apply_repo, valid, wait_streamed, worker
from tests.test_streams_exact import ads_traffic


def test_a_restarted_embedded_broker_loses_no_new_event(tmp_path: Path) -> None:
    first = ads_traffic(300, seed=1, users=20, rate=100)
    second = ads_traffic(300, seed=2, users=20, rate=100, start_us=max(r["ts"] for _, r in first) + 120_000_000)
    sent: list[dict] = []
    for i, batch in enumerate((first, second)):
        with EmbeddedBroker() as broker:
            s = Settings(data_dir=tmp_path, bootstrap_servers=broker.bootstrap_servers, topic_prefix="x.",
                         partitions=2)
            apply_repo(s)
            with worker(s, "streams", log_name=f"streams{i}") as p:
                publish(s, batch)
                wait_streamed(s, batch, [], alive=p)
        sent += valid(batch, "events.impressions")
        rows = delta.read(s.offline_dir / "bronze_impressions", ["event_id", "_offset"])
        assert sorted(rows["event_id"]) == sorted(r["event_id"] for r in sent), f"after broker {i + 1}"
    assert rows["_offset"].min() == 0 and rows["event_id"].is_unique  # both logs began at 0; nothing doubled
