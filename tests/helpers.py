"""Test helpers: run a worker as a real child process, wait for conditions, read topics."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

from confluent_kafka import Consumer, TopicPartition
from feast import FeatureStore

from driftloop.app.supervisor import settings_env
from driftloop.core import delta
from driftloop.core.declarations import Declarations, bronze_table
from driftloop.core.kafka import consumer_config, good_messages, make_consumer, read_past_reported_end
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.features.repo import apply


@contextlib.contextmanager
def worker(settings: Settings, name: str, ready_timeout: float = 90) -> Iterator[subprocess.Popen]:
    log = open(settings.root / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.app.cli", "worker", name],
                            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (settings.run_dir / f"{name}.ready").exists() or proc.poll() is not None, ready_timeout)
        assert proc.poll() is None, f"{name} worker died: see {settings.root / f'{name}.log'}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def apply_repo(settings: Settings) -> tuple[FeatureStore, Declarations]:
    """``driftloop apply`` the settings' repo and create its declared topics."""
    store, _plan, decls = apply(settings)
    ensure_topics(settings)
    return store, decls


def wait_for(cond: Callable[[], object], timeout: float, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def read_topic(settings: Settings, topic: str, n: int, timeout: float = 30.0) -> list:
    """The first ``n`` messages of a topic (from the beginning)."""
    c = make_consumer(settings, f"test-{uuid.uuid4().hex}", [topic])
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += good_messages(c.consume(1000, 0.3))
    finally:
        c.close()
    return out


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """The real end offset of every partition of a logical topic.

    Tansu reports a partition's end as the base offset of its last record batch + 1, so the rest of
    that batch is read to find the true end."""
    full = settings.topic(topic)
    c = Consumer(consumer_config(settings, f"test-{uuid.uuid4().hex}"))
    try:
        ends = {p: c.get_watermark_offsets(TopicPartition(full, p), timeout=10)[1] for p in range(settings.partitions)}
    finally:
        c.close()
    for m in read_past_reported_end(settings, full, range(settings.partitions), idle_polls=5):
        ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
    return ends


def wait_committed(settings: Settings, group: str, topics: list[str], timeout: float) -> None:
    """Until ``group`` has committed every partition of ``topics`` up to its end: all its writes are done."""
    ends = {(t, p): e for t in topics for p, e in end_offsets(settings, t).items()}
    c = Consumer(consumer_config(settings, group))
    last: dict = {}
    try:
        def done() -> bool:
            tps = [TopicPartition(settings.topic(t), p) for t, p in ends]
            got = c.committed(tps, timeout=10)
            last.update({(t, tp.partition): tp.offset for (t, _), tp in zip(ends, got, strict=True)})
            return all(last[k] >= e for k, e in ends.items())
        try:
            wait_for(done, timeout, every=1.0)
        except AssertionError as e:
            raise AssertionError(f"{group} did not commit to the end: committed {last}, ends {ends}") from e
    finally:
        c.close()


def valid(events: list[tuple[str, dict]], topic: str) -> list[dict]:
    """The records of ``events`` (``(logical topic, record)``) sent to ``topic``."""
    return [r for t, r in events if t == topic]


def wait_streamed(s: Settings, events: list[tuple[str, dict]], views: list, timeout: float) -> None:
    """Until every event (all valid and on time) is in its topic's bronze table, every view without a udf has
    a row per event of its topic, and the streams group has committed every source partition (so the online
    rows and labels of the last batch are written too)."""
    def rows(name: str) -> int:
        return len(delta.read(s.offline_dir / name, ["_offset"]))

    topics = sorted({t for t, _ in events})
    want = {bronze_table(t): len(valid(events, t)) for t in topics}
    want.update({v.name: len(valid(events, v.topic)) for v in views if v.udf is None})
    wait_for(lambda: all(rows(n) >= c for n, c in want.items()), timeout, every=1.0)
    wait_committed(s, f"{s.topic_prefix}streams", topics, 120)
