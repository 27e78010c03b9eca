"""Measured fixes to faust-streaming 0.15.3 for the embedded broker and for throughput.

* Faust fixes the consumer's ``fetch_max_wait_ms`` at 1500 ms and Tansu holds every fetch that long
  (ARCHITECTURE.md): the consumer class gets our short fetch wait.
* ``Consumer._drain_messages`` wraps every message in ``wait_first`` (four tasks and an
  ``asyncio.wait`` per record), which capped a do-nothing ``take_events`` agent at about 5k records/s
  here. The patched loop awaits the message callback directly and keeps ``wait_first`` only while flow
  is suspended (a rebalance), which is when Faust needs to abandon a blocked delivery.
* Batch dispatch (``route_batches``): records of the registered topics skip Faust's per-record
  Event/Stream layer (about 100 µs per record here). Each fetch round goes to one async handler as a
  list of Faust ``Message`` objects; they are tracked before and acked when the handler says their writes
  are durable (it may say so later, when it commits several rounds at once), so Faust's own commit loop
  commits only offsets whose writes are done. While flow is suspended (a
  rebalance) such records are dropped unacked; Faust seeks to the committed offsets afterwards.
  Rounds are merged while a batch waits less than ``LINGER_SHARE`` of the last batch's handling time (at
  most ``BATCH_LINGER_S``): aiokafka fetches again only once its buffer is drained and Tansu holds each
  fetch for its full wait, so under a backlog one round alone carries just a fetch wait's worth of
  records and merging makes the per-batch costs (Delta commits, flush) rarer; with live traffic handled
  quickly a batch waits a few milliseconds at most.

Both are private to Faust (``Consumer._drain_messages`` is a modified copy of Faust's; the consumer class
is rebound in the ``aiokafka`` module Faust's driver creates it from), so they are pinned to the versions
they were written for (``WRITTEN_FOR``): ``problems()`` lists what differs on the installed ones (versions,
the patched attributes' signatures, the source of the Faust code the copy was made from),
tests/test_private_guards.py fails on any of it, and ``apply()`` logs it. Faust's public stream API (an
agent over ``stream.take``) was measured at about 5k records/s here, too slow for the hot path.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiokafka
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka

from driftloop.core.kafka import FETCH_WAIT_MS

log = logging.getLogger(__name__)

_applied = False
WRITTEN_FOR = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}
# Faust's code the patched loop copies or relies on: sha256 (first 16 hex digits) of each method's source
FAUST_SOURCES = {
    "_drain_messages": "44a2500309e83c63",  # the copy below is this loop, changed as the module docstring says
    "track_message": "217d7f1399a4cd8e",
    "ack": "5fcf41cf45153475",
    "_add_gap": "4df2573ded7c1c2c",
    "_new_offset": "1d2c7ea89a7ad4f1",  # commits the acked offsets, stopping at a gap
    "perform_seek": "0e8c130ff4b0afd8",
    "getmany": "4b168d84882a70d6",
}
# Faust's methods as imported, before ``apply()`` replaces one of them
_ORIGINAL = {name: getattr(faust_consumer.Consumer, name) for name in FAUST_SOURCES}
BATCH_LINGER_S = 0.1  # the longest a batch waits for more rounds
LINGER_SHARE = 0.25  # ... as a share of the last batch's handling time
BATCH_MAX_RECORDS = 50_000
BatchHandler = Callable[[list[Any], Callable[[], None]], Awaitable[None]]
_batch_handlers: dict[str, BatchHandler] = {}


def route_batches(topics: Iterable[str], handler: BatchHandler) -> None:
    """Deliver records of ``topics`` (full names) to ``handler(messages, done)`` a fetch round at a time; the
    handler calls ``done()`` once the batch's writes are durable (possibly after it returned, with a later
    batch), which acks its records for Faust's commit loop."""
    for t in topics:
        _batch_handlers[t] = handler


def _ack(consumer: Any, messages: list[Any]) -> None:
    for m in messages:
        consumer.ack(m)


class ShortFetchConsumer(aiokafka.AIOKafkaConsumer):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["fetch_max_wait_ms"] = FETCH_WAIT_MS
        super().__init__(*args, **kwargs)


async def _drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - runs inside Faust
    callback = self.callback
    getmany = self.getmany
    consumer_stopped = self._stopped.is_set
    fetcher_stopped = fetcher._stopped.is_set
    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    acks_enabled_for = self.app.topics.acks_enabled_for
    suspended = self.suspend_flow.is_set
    since_yield = 0
    loop = asyncio.get_running_loop()
    batches: dict[BatchHandler, list[Any]] = {}
    started = 0.0
    linger = 0.0  # how long the batch being gathered may wait for more rounds
    try:
        while not (consumer_stopped() or fetcher_stopped()):
            self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
            ait = getmany(timeout=max(0.001, started + linger - loop.time()) if batches else 1.0)
            await asyncio.sleep(0)
            if self.should_stop:
                continue
            async for tp, message in ait:
                since_yield += 1
                if since_yield > 1000:
                    await asyncio.sleep(0)
                    since_yield = 0
                offset = message.offset
                r_offset = get_read_offset(tp)
                if r_offset is not None and offset < r_offset:
                    continue
                if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                    await self._add_gap(tp, r_offset + 1, offset)
                handler = _batch_handlers.get(message.topic)
                if handler is not None:
                    if suspended():
                        continue
                    self.track_message(message)
                    if not batches:
                        started = loop.time()
                    batches.setdefault(handler, []).append(message)
                    set_read_offset(tp, offset)
                    continue
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                if suspended():
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                else:
                    await callback(message)
                set_read_offset(tp, offset)
            if batches and suspended():  # a rebalance: leave them unacked; Faust seeks to the committed offsets
                batches = {}
            pending = sum(len(m) for m in batches.values())
            if pending and (pending >= BATCH_MAX_RECORDS or loop.time() - started >= linger):
                began = loop.time()
                for handler, messages in batches.items():
                    await handler(messages, functools.partial(_ack, self, messages))
                batches = {}
                linger = min(BATCH_LINGER_S, LINGER_SHARE * (loop.time() - began))
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            return
        raise
    finally:
        self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)


def _source_hash(fn: Any) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


def problems() -> list[str]:
    """What differs, on the installed libraries, from what the patches were written for (empty: nothing)."""
    out = []
    for dist, want in WRITTEN_FOR.items():
        got = importlib.metadata.version(dist)
        if got != want:
            out.append(f"{dist} {got} is installed")
    for name, want in FAUST_SOURCES.items():
        if _source_hash(_ORIGINAL[name]) != want:
            out.append(f"the source of faust.transport.consumer.Consumer.{name} changed")
    params = list(inspect.signature(_ORIGINAL["_drain_messages"]).parameters)
    if params != ["self", "fetcher"]:
        out.append(f"Consumer._drain_messages takes {params}, not (self, fetcher)")
    consumer_src = inspect.getsource(faust_consumer.Consumer)
    for attr in ("_read_offset", "_committed_offset", "_acked", "_gap", "_commit_every", "_n_acked", "suspend_flow",
                 "consumer_stopped_errors", "callback", "diag", "should_stop"):
        if f"self.{attr}" not in consumer_src:
            out.append(f"Consumer no longer uses self.{attr}")
    if not hasattr(faust_consumer, "CONSUMER_FETCHING"):
        out.append("faust.transport.consumer has no CONSUMER_FETCHING")
    create = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    if "aiokafka.AIOKafkaConsumer(" not in create or "fetch_max_wait_ms=1500" not in create:
        out.append("Faust's AIOKafkaConsumerThread._create_worker_consumer no longer builds "
                   "aiokafka.AIOKafkaConsumer with fetch_max_wait_ms=1500")
    consumer_init = inspect.signature(ShortFetchConsumer.__bases__[0].__init__).parameters  # aiokafka's own
    if "fetch_max_wait_ms" not in consumer_init:
        out.append("aiokafka.AIOKafkaConsumer takes no fetch_max_wait_ms")
    return out


def guard_message(found: list[str]) -> str:
    """The guard's message for ``problems()``' list."""
    return (f"streams/faust_patches.py was written for faust-streaming {WRITTEN_FOR['faust-streaming']} / aiokafka "
            f"{WRITTEN_FOR['aiokafka']}; found: {'; '.join(found)}: re-check the patch (its copy of "
            "Consumer._drain_messages against the new Faust source, the acked-offset commit it relies on, the "
            "consumer rebinding) and then update WRITTEN_FOR and FAUST_SOURCES")


def apply() -> None:
    """Install both patches (idempotent); call before the Faust app starts its consumer."""
    global _applied
    if _applied:
        return
    found = problems()
    if found:
        log.warning("%s", guard_message(found))
    aiokafka.AIOKafkaConsumer = ShortFetchConsumer  # type: ignore[misc]
    faust_consumer.Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    _applied = True
