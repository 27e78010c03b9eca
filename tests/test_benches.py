"""The benches' own measurements: the pipe latency on the real broker, and ``driftloop bench engine``'s report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from driftloop.bench.pipe import pipe_latency
from driftloop.bench.streams import backlog_events
from driftloop.core.settings import Settings
from tests.test_cli import cli


def test_pipe_latency_receives_every_record_and_times_it_by_the_wall_clock(settings: Settings):
    t0 = time.time()
    got = pipe_latency(settings, rate=500, seconds=2)
    took = time.time() - t0
    assert got["records"] == got["sent"] >= 950  # 2 s at 500/s, paced every 20 ms: every record sent arrived
    assert 0 < got["p50"] <= got["p99"] <= got["max"] < took  # no record is older than the whole measurement


def test_bench_engine_reports_its_backlog_in_a_last_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rc, out, _ = cli(capsys, "--data-dir", str(tmp_path), "bench", "engine", "--events", "2000", "--batch", "500",
                     "--repeats", "2")
    assert rc == 0
    lines = out.strip().splitlines()
    assert sum(line.startswith("[") for line in lines) == 2  # one line per repeat
    got = json.loads(lines[-1])
    assert got["events"] == len(backlog_events(2000, seed=1))  # impressions and their clicks, every one processed
    assert got["events_per_s_min"] <= got["events_per_s"] <= got["events_per_s_max"]
    assert got["us_per_event"] == pytest.approx(1e6 / got["events_per_s"], rel=1e-3)
