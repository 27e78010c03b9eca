"""Test helpers: run a worker as a real child process, wait for conditions, read topics."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

from driftloop.infra.kafka import good_messages, make_consumer
from driftloop.infra.settings import Settings
from driftloop.infra.supervisor import settings_env


@contextlib.contextmanager
def worker(settings: Settings, name: str, ready_timeout: float = 90) -> Iterator[subprocess.Popen]:
    log = open(settings.root / f"{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "driftloop.infra.cli", "worker", name],
                            env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (settings.run_dir / f"{name}.ready").exists() or proc.poll() is not None, ready_timeout)
        assert proc.poll() is None, f"{name} worker died: see {settings.root / f'{name}.log'}"
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(cond: Callable[[], object], timeout: float, every: float = 0.3) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def read_topic(settings: Settings, topic: str, n: int, timeout: float = 30.0) -> list:
    """The first ``n`` messages of a topic (from the beginning)."""
    c = make_consumer(settings, f"test-{uuid.uuid4().hex}", [topic])
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += good_messages(c.consume(1000, 0.3))
    finally:
        c.close()
    return out
