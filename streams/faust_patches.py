"""Measured fixes to faust-streaming 0.15.3 for the embedded broker and for throughput.

* Faust fixes the consumer's ``fetch_max_wait_ms`` at 1500 ms and Tansu holds every fetch that long
  (ARCHITECTURE.md): the consumer class gets our short fetch wait.
* ``Consumer._drain_messages`` wraps every message in ``wait_first`` (four tasks and an
  ``asyncio.wait`` per record), which capped a do-nothing ``take_events`` agent at about 5k records/s
  here. The patched loop awaits the message callback directly and keeps ``wait_first`` only while flow
  is suspended (a rebalance), which is when Faust needs to abandon a blocked delivery.
* Batch dispatch (``route_batches``): records of the registered topics skip Faust's per-record
  Event/Stream layer (about 100 µs per record here). Each fetch round goes to one async handler as a
  list of Faust ``Message`` objects (rounds are merged for up to ``BATCH_LINGER_S``, because aiokafka
  fetches again only once its buffer is drained and Tansu holds each fetch for its full wait, so one
  round alone carries just a fetch wait's worth of records); they are tracked before and acked after
  the handler returns, so
  Faust's own commit loop commits only offsets whose writes are done. While flow is suspended (a
  rebalance) such records are dropped unacked; Faust seeks to the committed offsets afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiokafka
from faust.transport import consumer as faust_consumer

from driftloop.core.kafka import FETCH_WAIT_MS

_applied = False
BATCH_LINGER_S = 0.1
BATCH_MAX_RECORDS = 50_000
BatchHandler = Callable[[list[Any]], Awaitable[None]]
_batch_handlers: dict[str, BatchHandler] = {}


def route_batches(topics: Iterable[str], handler: BatchHandler) -> None:
    """Deliver records of ``topics`` (full names) to ``handler`` a fetch round at a time."""
    for t in topics:
        _batch_handlers[t] = handler


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
    try:
        while not (consumer_stopped() or fetcher_stopped()):
            self.diag.set_flag(faust_consumer.CONSUMER_FETCHING)
            ait = getmany(timeout=BATCH_LINGER_S / 2 if batches else 1.0)
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
            if pending and (pending >= BATCH_MAX_RECORDS or loop.time() - started >= BATCH_LINGER_S):
                for handler, messages in batches.items():
                    await handler(messages)
                    for m in messages:
                        self.ack(m)
                batches = {}
            self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)
    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            return
        raise
    finally:
        self.diag.unset_flag(faust_consumer.CONSUMER_FETCHING)


def apply() -> None:
    """Install both patches (idempotent); call before the Faust app starts its consumer."""
    global _applied
    if _applied:
        return
    aiokafka.AIOKafkaConsumer = ShortFetchConsumer  # type: ignore[misc]
    faust_consumer.Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    _applied = True
