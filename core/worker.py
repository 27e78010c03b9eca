"""Shared plumbing of the confluent-kafka workers: stop on SIGTERM/SIGINT, readiness files."""

from __future__ import annotations

import logging
import signal
import time

from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT; workers finish the batch in hand, then exit."""

    def __init__(self) -> None:
        self.stopped = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        self.stopped = True

    def __bool__(self) -> bool:
        return self.stopped


def mark_ready(settings: Settings, name: str) -> None:
    (settings.run_dir / f"{name}.ready").write_text(str(time.time()))
