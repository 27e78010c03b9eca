"""The pipe rate: the same records consumed and produced back with no work, the limit a worker on this
machine and broker cannot beat. Both the streams and the serving bench measure it in the same run,
so their rates can be read as a share of it.

One consumer in a group of its own reads the topics from the beginning; every record goes to one
output topic through the same producer configuration the workers use; each batch is flushed and its
offsets committed, as a worker commits only what is acknowledged. ``pipe_rates`` takes it several times (a
group of its own each) and gives the median and spread: on a shared machine one measurement can be off by half.
"""

from __future__ import annotations

import time
import uuid

from driftloop.bench.common import spread
from driftloop.core.kafka import flush_or_raise, good_messages, make_consumer, make_producer, produce_all
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics

BATCH = 10_000


def pipe_rate(settings: Settings, topics: list[str], expected: int, timeout: float = 300.0) -> float:
    """Records/s of a do-nothing consume → produce → flush → commit loop over ``expected`` records of
    ``topics`` (logical names), timed from the first record read to the last batch committed."""
    out = f"pipe-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings, [out])
    consumer = make_consumer(settings, f"{settings.topic_prefix}{out}", topics)
    producer = make_producer(settings)
    target = settings.topic(out)
    done, t0 = 0, None
    deadline = time.monotonic() + timeout
    try:
        while done < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipe: only {done:,} of {expected:,} records read in {timeout:.0f}s")
            msgs = good_messages(consumer.consume(BATCH, 0.2))
            if not msgs:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            produce_all(producer, [(target, m.key(), m.value(), None) for m in msgs])
            flush_or_raise(producer)
            consumer.commit(asynchronous=False)
            done += len(msgs)
        return done / max(time.perf_counter() - (t0 or 0.0), 1e-9)
    finally:
        consumer.close()


def pipe_rates(settings: Settings, topics: list[str], expected: int, times: int = 3) -> dict[str, float]:
    """``pipe_rate`` measured ``times`` times, one after another: median, min and max records/s."""
    rates = [pipe_rate(settings, topics, expected) for _ in range(times)]
    print("pipe: " + ", ".join(f"{r:,.0f}/s" for r in rates), flush=True)
    return spread(rates)
