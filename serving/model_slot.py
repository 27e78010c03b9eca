"""The hot-swap slot: load + verify a pinned version in the background, swap one reference between batches.

The scoring loop reads ``slot.current`` once per batch, so a batch is never scored by two versions and
no weights are ever copied into a live model.
"""

from __future__ import annotations

import logging
import threading
import time

from driftloop.infra import models
from driftloop.infra.metrics import SERVING_VERSION, SWAPS
from driftloop.infra.settings import Settings

log = logging.getLogger(__name__)


class ModelSlot:
    def __init__(self, settings: Settings, features: list[str], on_reject=None):  # noqa: ANN001
        self.s = settings
        self.features = features
        self.current: models.OnnxScorer | None = None
        self._pending: models.OnnxScorer | None = None
        self._loading = threading.Lock()
        self._bad: set[str] = set()
        self.on_reject = on_reject
        self.last_swap_s = 0.0

    def refresh(self, wait: bool = False) -> None:
        """Resolve the champion alias and load that version in the background if it is new."""
        t = threading.Thread(target=self._load_alias, daemon=True)
        t.start()
        if wait:
            t.join()

    def _load_alias(self) -> None:
        if not self._loading.acquire(blocking=False):
            return
        try:
            version = models.alias_version(self.s)
            have = self._pending or self.current
            if version is None or (have and have.version == version) or version in self._bad:
                return
            t0 = time.perf_counter()
            try:
                self._pending = models.load_scorer(self.s, version, self.features)
            except models.ModelCheckError as e:
                self._bad.add(version)
                log.error("not serving v%s: %s", version, e)
                if self.on_reject:
                    self.on_reject(version, str(e))
                return
            log.info("loaded and verified v%s in %.3fs", version, time.perf_counter() - t0)
        finally:
            self._loading.release()

    def swap_if_ready(self) -> bool:
        """Called between batches: make the verified pending version current."""
        new = self._pending
        if new is None:
            return False
        self._pending = None
        old = self.current
        self.current = new
        self.last_swap_s = time.time()
        SERVING_VERSION.labels(model=new.name).set(float(new.version))
        SWAPS.labels(model=new.name).inc()
        log.info("serving %s v%s (was %s)", new.name, new.version, old.version if old else None)
        return True
