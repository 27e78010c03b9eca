"""``driftloop bench streams``: sustained throughput and freshness of the streams worker against the pipe
rate and the per-event Faust baseline, in one run.

1. Throughput, ``repeats`` times: a backlog of generated events (the example's 3 stream feature views,
   both sinks on) drained by a fresh worker, each time on a fresh embedded broker (one Tansu broker that
   holds the earlier backlogs in memory served each later repeat slower: 28.8k, 20.0k, 19.2k events/s
   in one run); the rate is taken from its durable bronze-row counter
   after a warm-up (the first ``WARMUP`` share of the backlog). Median, min and max are reported, and
   the worker's resident memory after 100k events and at the end (its state is bounded by the
   entities and windows, not by the number of events).
2. Pipe rate: the last backlog consumed and produced back with no work (``bench/pipe.py``) on the last
   repeat's broker, three times: the median.
3. Freshness: live events at ``rate`` events/s stamped with the wall clock; event time → online
   write, from the worker's histogram. Dead-lettered events count as processed (and are reported),
   so the bench never waits for rows that will not come.
4. Baseline: a small backlog through ``streams_baseline`` (one table update and one Feast write per
   event and view).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from driftloop.app.producer import publish
from driftloop.bench.common import (
    broker,
    histogram_quantile,
    isolated,
    report,
    rss_mb,
    running,
    spread,
    total,
)
from driftloop.bench.pipe import pipe_rates
from driftloop.core.contracts import now_us
from driftloop.core.metrics import scrape
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import apply

log = logging.getLogger(__name__)

WARMUP = 0.1
GEN_RATE = 5000.0  # impressions/s of event time in the generated backlogs
RSS_AT = 100_000


def bronze_rows(samples: dict) -> float:
    """Events durable in Delta: bronze rows of every topic."""
    return sum(v for (n, lb), v in samples.items()
               if n == "driftloop_rows_written_total" and dict(lb).get("sink", "").startswith("delta:bronze_"))


def processed(samples: dict) -> float:
    """Events the worker is done with: durable bronze rows plus dead letters."""
    return bronze_rows(samples) + total(samples, "driftloop_dlq_total")


def dead_letters(samples: dict) -> dict[str, int]:
    return {dict(lb)["reason"]: int(v) for (n, lb), v in samples.items() if n == "driftloop_dlq_total" and v}


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


def drain(port: int, count: Callable[[dict], float], target: float, stalled_s: float = 60.0,
          pid: int | None = None, warmup: float = 0.0) -> tuple[float, dict[int, float]]:
    """Poll a worker's metrics until ``count`` reaches ``target``. Returns the rate after the first
    ``warmup`` share of ``target`` (from its first move when 0) and, with ``pid``, the worker's RSS
    (MiB) when the count passed ``RSS_AT`` and at the end. Raises once nothing moved for ``stalled_s``."""
    series: list[tuple[float, float]] = []
    rss: dict[int, float] = {}
    last_print = last_move = time.monotonic()
    while True:
        done = count(scrape(port))
        now = time.monotonic()
        if series and done > series[-1][1]:
            last_move = now
        series.append((now, done))
        if pid is not None and done >= RSS_AT and RSS_AT not in rss:
            rss[RSS_AT] = rss_mb(pid)[0]
        if now - last_print > 2:
            last_print = now
            print(f"  {done:,.0f} / {target:,.0f}", flush=True)
        if done >= target:
            break
        if now - last_move > stalled_s:
            raise TimeoutError(f"no progress for {stalled_s:.0f}s at {done:,.0f} of {target:,.0f} events")
        time.sleep(0.2)
    if pid is not None:
        rss[int(done)] = rss_mb(pid)[0]
    floor = max(warmup * target, series[0][1])
    first = next((i for i, (_, d) in enumerate(series) if d > floor), len(series) - 1)
    t0, d0 = series[max(first - 1, 0)]
    t1, d1 = series[-1]
    return (d1 - d0) / max(t1 - t0, 1e-9), rss


def stamped(events: list[tuple[str, dict]], start_us: int) -> list[tuple[str, dict]]:
    """Events generated from time 0, moved to start at ``start_us`` (the moment they start to be sent: stamped
    before generating them, every event would carry the generation's seconds as latency)."""
    for _topic, rec in events:
        rec["ts"] += start_us
    return events


def backlog_events(n: int, seed: int) -> list[tuple[str, dict]]:
    """``n`` impressions (+ about 20% clicks) stamped in the past, ending a minute ago."""
    span_us = int((n / GEN_RATE + 60) * 1e6)
    return synthetic_events(n, rate=GEN_RATE, disorder_s=2.0, seed=seed, start_us=now_us() - span_us)


def run(base: Settings, events: int = 200_000, rate: float = 5000.0, fresh_s: float = 20.0,
        baseline_events: int = 5000, repeats: int = 3) -> dict[str, Any]:
    rates: list[float] = []
    for i in range(repeats):
        with broker(base) as bootstrap:  # a fresh embedded broker each time: one that holds the earlier
            s = isolated(base, bootstrap, "streams")  # backlogs serves later ones slower
            apply(s)
            ensure_topics(s)  # the declared topics
            backlog = backlog_events(events, seed=1 + i)
            print(f"[{i + 1}/{repeats}] producing a backlog of {len(backlog):,} events ...", flush=True)
            publish(s, backlog)
            with running(s, "streams") as child:
                eps, rss = drain(s.metrics_port, processed, len(backlog), pid=child.proc.pid, warmup=WARMUP)
                rates.append(eps)
                print(f"[{i + 1}/{repeats}] throughput: {eps:,.0f} events/s; RSS "
                      + ", ".join(f"{v:,.0f} MiB at {k:,} events" for k, v in sorted(rss.items())), flush=True)
                if i < repeats - 1:
                    continue
                before = settled(s.metrics_port, total_freshness)  # the backlog's last online rows are in
                live = synthetic_events(int(fresh_s * rate / 1.2), rate=rate / 1.2, start_us=0, seed=99)
                print(f"freshness: {len(live):,} live events at {rate:,.0f}/s", flush=True)
                publish(s, stamped(live, now_us()), rate=rate)
                drain(s.metrics_port, processed, len(backlog) + len(live))
                after = scrape(s.metrics_port)
                peak = rss_mb(child.proc.pid)[1]
            dlq = dead_letters(after)
            if dlq:
                print(f"dead-lettered: {dlq}", flush=True)
            topics = sorted({t for t, _ in backlog})
            print("pipe: the last backlog consumed and produced back with no work", flush=True)
            pipes = pipe_rates(s, topics, len(backlog))
            pipe = pipes["median"]

            name = "driftloop_feature_freshness_seconds"
            p50, p99 = (histogram_quantile(q, before, after, name) for q in (0.5, 0.99))
            med = spread(rates)
            print(f"throughput {med['median']:,.0f} events/s (min {med['min']:,.0f}, max {med['max']:,.0f}) = "
                  f"{med['median'] / pipe:.0%} of the pipe rate {pipe:,.0f}/s (median of 3, {pipes['min']:,.0f}-"
                  f"{pipes['max']:,.0f})", flush=True)
            print(f"freshness p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms at {rate:,.0f} events/s; "
                  f"peak RSS {peak:,.0f} MiB", flush=True)

            b = isolated(base, bootstrap, "baseline")
            apply(b)
            ensure_topics(b)
            back = backlog_events(baseline_events, seed=3)
            publish(b, back)
            argv = [sys.executable, "-m", "driftloop.bench.streams_baseline"]
            with running(b, "baseline", argv=argv):
                print("per-event baseline: draining", flush=True)
                base_eps, _ = drain(b.metrics_port, lambda m: total(m, "driftloop_events_in_total"), len(back))
            print(f"baseline: {base_eps:,.0f} events/s", flush=True)
    result = {"events": len(backlog), "repeats": repeats, "events_per_s": round(med["median"]),
              "events_per_s_min": round(med["min"]), "events_per_s_max": round(med["max"]),
              "pipe_events_per_s": round(pipe), "pipe_events_per_s_min": round(pipes["min"]),
              "pipe_events_per_s_max": round(pipes["max"]), "pipe_share": round(med["median"] / pipe, 3),
              "baseline_events_per_s": round(base_eps), "ratio": round(med["median"] / base_eps, 1),
              "freshness_p50_s": round(p50, 4), "freshness_p99_s": round(p99, 4), "freshness_rate": rate,
              "dead_lettered": dlq, "peak_rss_mib": round(peak), "rss_mib": {str(k): round(v) for k, v in rss.items()}}
    report(result)
    return result
