"""Publishing events: a model's traffic generator at a rate (``driftloop produce``, the demo) and
pre-built record lists (tests, benchmarks). Records are keyed by their topic's declared key."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from driftloop.core.contracts import now_us
from driftloop.core.declarations import Declarations
from driftloop.core.kafka import flush_or_raise, make_producer, produce_raw
from driftloop.core.settings import Settings
from driftloop.features.repo import on_path

log = logging.getLogger(__name__)


class Generator(Protocol):
    """What a model's ``generator="module:Class"`` provides: ``Class(seed=..., drift_at=...)``."""

    produced: int
    drift_at: int | None

    @property
    def drifted(self) -> bool: ...

    def next(self, ts: int) -> list[tuple[str, str, dict]]:
        """One scored event (and its outcomes) as ``(logical topic, key, record)``."""
        ...


def load_generator(settings: Settings, model: str, seed: int = 7, drift_at: int | None = None) -> Generator:
    """The declared traffic generator of ``model`` (imported from the repo)."""
    spec = Declarations.load(settings.declarations_file).model(model)
    if not spec.generator:
        raise ValueError(f"model {model!r} declares no generator (Model(generator='module:Class'))")
    on_path(settings.feature_repo_dir)
    mod, _, cls = spec.generator.partition(":")
    return getattr(importlib.import_module(mod), cls)(seed=seed, drift_at=drift_at)


def produce(settings: Settings, generators: list[Generator], rate: float, count: int | None = None,
            duration: float | None = None, should_stop: Callable[[], bool] = lambda: False,
            progress: bool = True) -> int:
    """Publish each generator's scored events at ``rate``/s (each) until count/duration/should_stop."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if count is None and duration is None:
        raise ValueError("give --count or --duration")
    producer = make_producer(settings)
    start = last_report = time.monotonic()
    sent = 0
    while not should_stop():
        elapsed = time.monotonic() - start
        if (count is not None and sent >= count) or (duration is not None and elapsed >= duration):
            break
        due = int(elapsed * rate) + 1 - sent
        if count is not None:
            due = min(due, count - sent)
        for _ in range(max(0, due)):
            for gen in generators:
                for topic, key, rec in gen.next(now_us()):
                    produce_raw(producer, settings.topic(topic), key.encode(), orjson.dumps(rec))
            sent += 1
        producer.poll(0)
        if progress and time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            log.info("produced %d scored events per model (%.0f/s)%s", sent, sent / max(elapsed, 1e-9),
                     "".join(f" [{type(g).__name__} drifted]" for g in generators if g.drifted))
        time.sleep(0.02)
    flush_or_raise(producer)
    return sent


def publish(settings: Settings, records: list[tuple[str, dict]] | list[tuple[str, bytes | None, bytes]],
            rate: float | None = None, **producer_config: Any) -> int:
    """Send ``(logical topic, record)`` items keyed by the topic's declared key, or ``(logical topic, key,
    raw value)`` items as they are, in order; paced at ``rate`` records/s when given. Returns the count
    once every record is acked."""
    producer = make_producer(settings, **producer_config)
    topics = Declarations.load(settings.declarations_file).topics
    names = {t: settings.topic(t) for t in {x[0] for x in records}}
    start = time.monotonic()
    for i, item in enumerate(records):
        if len(item) == 2:
            topic, rec = item
            key, value = str(rec[topics[topic].key]).encode(), orjson.dumps(rec)
        else:
            topic, key, value = item
        produce_raw(producer, names[topic], key, value)
        if rate and i % 100 == 0:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            producer.poll(0)
    flush_or_raise(producer)
    return len(records)
