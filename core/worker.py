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


class DeclarationsWatch:
    """Tells a worker that ``driftloop apply`` wrote new declarations since it started.

    Workers check it between batches and exit (code ``RESTART_EXIT``) once their batch is done; the
    supervisor starts them again on the new declarations, so a newly applied model is picked up by a
    running stack."""

    def __init__(self, settings: Settings, every_s: float = 2.0):
        self.path = settings.declarations_file
        self.every_s = every_s
        self._seen = self._stamp()
        self._next = time.monotonic() + every_s

    def _stamp(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def changed(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        if self._stamp() != self._seen:
            log.info("%s changed: restarting on the new declarations", self.path)
            return True
        return False


RESTART_EXIT = 75  # EX_TEMPFAIL: the supervisor starts the worker again
