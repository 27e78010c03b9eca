"""The pipe rate: the same records consumed and produced back with no work, the limit a worker on this
machine and broker cannot beat. Both the streams and the serving bench measure it in the same run,
so their rates can be read as a share of it.

One consumer in a group of its own reads the topics from the beginning; every record goes to one
output topic through the same producer configuration the workers use; each batch is flushed and its
offsets committed, as a worker commits only what is acknowledged. ``pipe_rates`` takes it several times (a
group of its own each) and gives the median and spread: on a shared machine one measurement can be off by half.

``pipe_latency`` is the same idea for latency: records stamped with the wall clock, produced at a fixed rate
and consumed with the workers' client settings; the time from stamp to receipt is what the broker and the
clients alone cost, the floor under any worker's event → prediction (or → online) latency.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np

from driftloop.bench.common import spread
from driftloop.core.kafka import flush_or_raise, good_messages, make_consumer, make_producer, produce_all, produce_raw
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


def pipe_latency(settings: Settings, rate: float, seconds: float, join_timeout: float = 60.0) -> dict[str, float]:
    """Stamp → receipt latency (s) of records produced at ``rate``/s for ``seconds`` (paced as ``driftloop
    produce`` paces, every 20 ms) and consumed by a consumer in a group of its own: p50, p99 and max, and the
    records received and sent."""
    topic = f"pipe-latency-{uuid.uuid4().hex[:6]}"
    ensure_topics(settings, [topic])
    consumer = make_consumer(settings, f"{settings.topic_prefix}{topic}", [topic])
    deadline = time.monotonic() + join_timeout
    while not consumer.assignment():  # joined before the first record is stamped
        if time.monotonic() > deadline:
            raise TimeoutError(f"pipe latency: no partitions assigned within {join_timeout:.0f}s")
        consumer.poll(0.1)
    full, sent = settings.topic(topic), [0]
    failed: list[Exception] = []

    def produce() -> None:
        producer, start = make_producer(settings), time.monotonic()
        try:
            while time.monotonic() - start < seconds:
                for _ in range(int((time.monotonic() - start) * rate) + 1 - sent[0]):
                    produce_raw(producer, full, str(sent[0]).encode(), repr(time.time()).encode())
                    sent[0] += 1
                producer.poll(0)
                time.sleep(0.02)
            flush_or_raise(producer)
        except Exception as e:  # re-raised by the caller
            failed.append(e)

    thread = threading.Thread(target=produce, name="pipe-latency", daemon=True)
    thread.start()
    lat: list[float] = []
    try:
        idle_until = time.monotonic() + 30
        while thread.is_alive() or len(lat) < sent[0]:
            msgs = good_messages(consumer.consume(1000, 0.05))
            now = time.time()
            lat += [now - float(m.value()) for m in msgs]
            if msgs or thread.is_alive():
                idle_until = time.monotonic() + 30
            elif time.monotonic() > idle_until:
                raise TimeoutError(f"pipe latency: {len(lat):,} of {sent[0]:,} records arrived")
    finally:
        thread.join()
        consumer.close()
    if failed:
        raise failed[0]
    p50, p99, top = np.percentile(lat, [50, 99, 100])
    print(f"pipe latency at {rate:,.0f}/s: p50 {p50:.4f} s, p99 {p99:.4f} s, max {top:.4f} s", flush=True)
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "max": round(float(top), 4), "records": len(lat),
            "sent": sent[0]}
