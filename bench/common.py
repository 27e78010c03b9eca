"""Shared benchmark plumbing: a broker, isolated settings, worker processes, Prometheus scraping."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator

from driftloop.app.supervisor import Child, settings_env
from driftloop.core.broker import EmbeddedBroker, free_port
from driftloop.core.metrics import bucket_quantile
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.features.repo import apply, init_repo

log = logging.getLogger(__name__)


@contextlib.contextmanager
def broker(settings: Settings) -> Iterator[str]:
    """The configured Kafka, or an embedded Tansu broker for the run."""
    if settings.bootstrap_servers:
        yield settings.bootstrap_servers
        return
    with EmbeddedBroker() as b:
        yield b.bootstrap_servers


def isolated(base: Settings, bootstrap: str, name: str, example: str | None = None,
             repo_files: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Settings with a data directory and topic prefix of their own; topics created.

    With ``example``, the settings get a feature repo of their own (``<data dir>/repo``): that example's
    files plus ``repo_files`` (file name → text), applied, and its declared topics created too."""
    run = uuid.uuid4().hex[:6]
    data_dir = base.root / "bench" / f"{name}-{run}"
    if example:
        init_repo(data_dir / "repo", example)
        for fname, text in (repo_files or {}).items():
            (data_dir / "repo" / fname).write_text(text)
        overrides = {"repo": data_dir / "repo", **overrides}
    s = Settings(**{**base.model_dump(), "data_dir": data_dir,
                    "bootstrap_servers": bootstrap, "topic_prefix": f"b{run}.", "metrics_port": free_port(),
                    **overrides})
    s.root.mkdir(parents=True, exist_ok=True)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(s)
    if example:
        ensure_topics(s, sorted(apply(s)[2].topics))
    return s


@contextlib.contextmanager
def running(settings: Settings, name: str, argv: list[str] | None = None, timeout: float = 120) -> Iterator[Child]:
    """A worker process that has reported ready; stopped (SIGTERM) on exit."""
    child = Child(name, settings_env(settings), settings.root / f"{name}.log", argv=argv)
    child.start()
    try:
        deadline = time.monotonic() + timeout
        while not (settings.run_dir / f"{name}.ready").exists():
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {child.log_file}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready in {timeout}s: see {child.log_file}")
            time.sleep(0.1)
        yield child
    finally:
        child.stop()


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= set(lb))


def histogram_quantile(q: float, before: dict, after: dict, name: str) -> float:
    """``q``-quantile of a histogram's observations between two scrapes (linear within a bucket)."""
    def buckets(s: dict) -> dict[float, float]:
        return {float(dict(lb)["le"]): v for (n, lb), v in s.items() if n == f"{name}_bucket"}
    b0, b1 = buckets(before), buckets(after)
    got = bucket_quantile(q, {e: c - b0.get(e, 0.0) for e, c in b1.items()})
    return float("nan") if got is None else got


def rss_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory now and at its peak, MiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    except OSError:
        return float("nan"), float("nan")
    kib = {k: float(fields[k].split()[0]) for k in ("VmRSS", "VmHWM") if k in fields}
    return kib.get("VmRSS", float("nan")) / 1024, kib.get("VmHWM", float("nan")) / 1024


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements, rounded."""
    v = sorted(values)
    mid = len(v) // 2
    median = v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2
    return {"median": round(median, 1), "min": round(v[0], 1), "max": round(v[-1], 1)}


def report(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)
