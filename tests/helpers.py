"""Test helpers: run a worker as a real child process, wait for conditions, read topics."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from feast import FeatureStore

from driftloop.app.supervisor import settings_env
from driftloop.core import delta
from driftloop.core.declarations import Declarations, bronze_table
from driftloop.core.kafka import consumer_config, good_messages, make_consumer, read_past_reported_end
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.features.repo import apply
from driftloop.streams.app import repartition_topic


@contextlib.contextmanager
def child(argv: list[str], log_file: Path, ready: Callable[[], object], timeout: float = 90,
          env: dict[str, str] | None = None, grace: float = 20) -> Iterator[subprocess.Popen]:
    """A child process logging to ``log_file``, yielded once ``ready()`` holds (it must not die first);
    stopped on exit with SIGTERM, then SIGKILL after ``grace`` seconds."""
    log = open(log_file, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or ready(), timeout)
        assert proc.poll() is None, f"{argv[0]} {argv[-1]} exited with {proc.returncode}: see {log_file}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def worker(settings: Settings, name: str, ready_timeout: float = 90, log_name: str | None = None
           ) -> Iterator[subprocess.Popen]:
    """A ``driftloop worker <name>`` child, once it marked itself ready; logs to ``<log_name or name>.log``."""
    ready = settings.run_dir / f"{name}.ready"
    ready.unlink(missing_ok=True)  # another worker of that name marked it
    with child([sys.executable, "-m", "driftloop.app.cli", "worker", name], settings.root / f"{log_name or name}.log",
               ready.exists, ready_timeout, env=settings_env(settings)) as proc:
        yield proc


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


def read_all(settings: Settings, topic: str, timeout: float = 30.0) -> list:
    """Every message a topic holds now (read up to its real end offsets)."""
    return read_topic(settings, topic, sum(end_offsets(settings, topic).values()), timeout)


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


def committed_offsets(settings: Settings, group: str, topics: list[str],
                      consumer: Consumer | None = None) -> dict[tuple[str, int], int]:
    """``group``'s committed offset per (logical topic, partition) of ``topics`` (-1 where none); ``consumer``:
    an open consumer of ``group`` to ask (else one is opened for the call)."""
    c = consumer or Consumer(consumer_config(settings, group))
    try:
        got = c.committed([TopicPartition(settings.topic(t), p) for t in topics for p in range(settings.partitions)],
                          timeout=10)
    finally:
        if consumer is None:
            c.close()
    names = {settings.topic(t): t for t in topics}
    return {(names[tp.topic], tp.partition): max(tp.offset, -1) for tp in got}


def wait_progress(done: Callable[[], bool], progress: Callable[[], object], stall_s: float,
                  describe: Callable[[], str], every: float = 1.0,
                  alive: subprocess.Popen | None = None) -> None:
    """Until ``done()``, for as long as ``progress()`` keeps changing: fails once it stayed the same for
    ``stall_s`` seconds (or at once if the ``alive`` process ended), with ``describe()``. A slow machine
    only makes the wait longer; a stall still fails."""
    last, since = progress(), time.monotonic()
    while not done():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the worker exited with {alive.returncode} before it was done: {describe()}")
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise AssertionError(f"no progress for {stall_s:g}s: {describe()}")
        time.sleep(every)


def wait_committed(settings: Settings, group: str, topics: list[str], stall_s: float = 90,
                   alive: subprocess.Popen | None = None) -> None:
    """Until ``group`` has committed every partition of ``topics`` up to its end (so all its writes are done),
    as long as its committed offsets keep moving; fails after ``stall_s`` seconds without a commit, listing
    committed vs end per partition."""
    ends = {(t, p): e for t in topics for p, e in end_offsets(settings, t).items()}
    got: dict[tuple[str, int], int] = {}
    c = Consumer(consumer_config(settings, group))

    def done() -> bool:  # commits only move forward: a partition missing from one answer keeps what it had
        for k, off in committed_offsets(settings, group, topics, c).items():
            got[k] = max(got.get(k, -1), off)
        return all(max(got.get(k, -1), 0) >= e for k, e in ends.items())

    def describe() -> str:
        return f"{group} did not commit to the end (committed/end): " + ", ".join(
            f"{t}[{p}] {got.get((t, p), -1)}/{e}" for (t, p), e in sorted(ends.items()))

    try:
        wait_progress(done, lambda: dict(got), stall_s, describe, alive=alive)
    finally:
        c.close()


def valid(events: list[tuple[str, dict]], topic: str) -> list[dict]:
    """The records of ``events`` (``(logical topic, record)``) sent to ``topic``."""
    return [r for t, r in events if t == topic]


def wait_streamed(s: Settings, events: list[tuple[str, dict]], views: list, stall_s: float = 90,
                  alive: subprocess.Popen | None = None) -> None:
    """Until every event (all valid and on time) is in its topic's bronze table, every view without a udf has
    a row per event of its topic, and the streams group has committed every partition of those topics and of
    their repartition topics (so the online rows and labels of the last batch are written too); as long as
    row counts, then commits, keep moving (fails after ``stall_s`` seconds without progress)."""
    topics = sorted({t for t, _ in events})
    want = {bronze_table(t): len(valid(events, t)) for t in topics}
    want.update({v.name: len(valid(events, v.topic)) for v in views if v.udf is None})
    got: dict[str, int] = {}

    def done() -> bool:
        got.update({n: len(delta.read(s.offline_dir / n, ["_offset"])) for n in want})
        return all(got[n] >= c for n, c in want.items())

    wait_progress(done, lambda: dict(got), stall_s,
                  lambda: "rows (got/want): " + ", ".join(f"{n} {got.get(n, 0)}/{c}" for n, c in want.items()),
                  alive=alive)
    wait_committed(s, f"{s.topic_prefix}streams", [*topics, *map(repartition_topic, topics)], stall_s, alive=alive)


@contextlib.contextmanager
def alert_webhook(sink: object, token: str = "test-token") -> Iterator[tuple[str, dict[str, str]]]:
    """A sink's alert webhook (``drift/webhook.py``) on a free port: (its base URL, bearer auth headers)."""
    from driftloop.drift.auth import WebhookAuth
    from driftloop.drift.webhook import create_app, start_server

    server = start_server(create_app(sink, WebhookAuth(token), rate_per_s=1000, burst=1000), "127.0.0.1", 0)
    try:
        yield server.url, {"Authorization": f"Bearer {token}"}
    finally:
        server.stop()
