"""``driftloop bench streams``: sustained throughput and freshness of the streams worker, and the
per-event Faust baseline, in one run on the same broker.

1. Throughput: a backlog of generated events (3 stream feature views, both sinks on) is processed by
   one worker; the rate is taken from its durable bronze-row counter between the first and last write.
2. Freshness: live events at ``rate`` events/s; event time → online write, from the worker's histogram.
3. Baseline: the same kind of backlog through ``streams_baseline`` (one table update and one Feast
   push per event and view).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from driftloop.app.producer import publish
from driftloop.bench.common import broker, histogram_quantile, isolated, report, running, scrape, total
from driftloop.core.contracts import now_us
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import apply

log = logging.getLogger(__name__)


def bronze_rows(samples: dict) -> float:
    """Events durable in Delta: bronze rows of every topic (every generated event is valid and on time)."""
    return sum(v for (n, lb), v in samples.items()
               if n == "driftloop_rows_written_total" and dict(lb).get("sink", "").startswith("delta:bronze_"))


def total_freshness(samples: dict) -> float:
    """Online rows whose freshness was observed."""
    return total(samples, "driftloop_feature_freshness_seconds_count")


def settled(port: int, count: Callable[[dict], float], quiet_s: float = 1.0, timeout: float = 60) -> dict:
    """A scrape once ``count`` stopped moving for ``quiet_s`` (the writes of the batch in flight are done)."""
    last, deadline = scrape(port), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = scrape(port)
        if count(now) == count(last):
            return now
        last = now
    return last


def drain(port: int, count: Callable[[dict], float], target: float, timeout: float = 600) -> float:
    """Poll a worker's metrics until ``count`` reaches ``target``; the rate between its first and last move."""
    series: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        done = count(scrape(port))
        series.append((time.monotonic(), done))
        if time.monotonic() - last_print > 2:
            last_print = time.monotonic()
            print(f"  {done:,.0f} / {target:,.0f}", flush=True)
        if done >= target:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done:,.0f} of {target:,.0f} processed in {timeout}s")
        time.sleep(0.2)
    first = next((i for i, (_, d) in enumerate(series) if d > series[0][1]), len(series) - 1)
    t0, d0 = series[max(first - 1, 0)]
    t1, d1 = series[-1]
    return (d1 - d0) / max(t1 - t0, 1e-9)


def run(base: Settings, events: int = 200_000, rate: float = 5000.0, fresh_s: float = 20.0,
        baseline_events: int = 5000) -> dict[str, Any]:
    with broker(base) as bootstrap:
        s = isolated(base, bootstrap, "streams")
        apply(s)
        ensure_topics(s)  # the declared topics
        backlog = synthetic_events(events, disorder_s=2.0, seed=1, start_us=now_us() - 3_600_000_000)
        print(f"producing a backlog of {len(backlog):,} events ...", flush=True)
        publish(s, backlog)
        with running(s, "streams"):
            print("streams worker: draining the backlog", flush=True)
            eps = drain(s.metrics_port, bronze_rows, len(backlog))
            print(f"throughput: {eps:,.0f} events/s", flush=True)
            before = settled(s.metrics_port, total_freshness)  # the backlog's last online rows are in
            live = synthetic_events(int(fresh_s * rate / 1.2), rate=rate / 1.2, start_us=now_us(), seed=2)
            print(f"freshness: {len(live):,} live events at {rate:,.0f}/s", flush=True)
            publish(s, live, rate=rate)
            drain(s.metrics_port, bronze_rows, len(backlog) + len(live))
            after = scrape(s.metrics_port)
        name = "driftloop_feature_freshness_seconds"
        p50, p99 = (histogram_quantile(q, before, after, name) for q in (0.5, 0.99))
        print(f"freshness p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms", flush=True)

        b = isolated(base, bootstrap, "baseline")
        apply(b)
        ensure_topics(b)
        back = synthetic_events(baseline_events, disorder_s=2.0, seed=3, start_us=now_us() - 3_600_000_000)
        publish(b, back)
        argv = [sys.executable, "-m", "driftloop.bench.streams_baseline"]
        with running(b, "baseline", argv=argv):
            print("per-event baseline: draining", flush=True)
            base_eps = drain(b.metrics_port, lambda m: total(m, "driftloop_events_in_total"), len(back))
        print(f"baseline: {base_eps:,.0f} events/s", flush=True)
    result = {"events": len(backlog), "events_per_s": round(eps), "baseline_events_per_s": round(base_eps),
              "ratio": round(eps / base_eps, 1), "freshness_p50_s": round(p50, 4), "freshness_p99_s": round(p99, 4),
              "freshness_rate": rate}
    report(result)
    return result
