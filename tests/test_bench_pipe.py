"""The pipe measurements the benches read their figures against, on the real broker."""

from __future__ import annotations

import time

from driftloop.bench.pipe import pipe_latency
from driftloop.core.settings import Settings


def test_pipe_latency_receives_every_record_and_times_it_by_the_wall_clock(settings: Settings):
    t0 = time.time()
    got = pipe_latency(settings, rate=500, seconds=2)
    took = time.time() - t0
    assert got["records"] == got["sent"] >= 950  # 2 s at 500/s, paced every 20 ms: every record sent arrived
    assert 0 < got["p50"] <= got["p99"] <= got["max"] < took  # no record is older than the whole measurement
