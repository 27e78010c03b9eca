"""The hot-swap slot: load + verify a pinned version in the background, swap one reference between batches.

The scoring loop reads ``slot.current`` once per batch, so a batch is never scored by two versions and
no weights are ever copied into a live model. A version that fails verification is never made current;
``on_reject`` is told why (serving publishes ``models.rejected``) and the slot keeps what it serves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from driftloop.registry import models
from driftloop.core.metrics import MODEL_REJECTS, SERVING_VERSION, SWAP_SECONDS, SWAPS
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

RejectHook = Callable[[str, str, str], None]  # (version, check, message)


class ModelSlot:
    def __init__(self, settings: Settings, features: list[str], alias: str = models.CHAMPION,
                 on_reject: RejectHook | None = None):
        self.s = settings
        self.features = features
        self.alias = alias
        self.current: models.Scorer | None = None
        self._pending: tuple[models.Scorer, float] | None = None  # (scorer, when the alias was seen)
        self._loading = threading.Lock()
        self._bad: set[str] = set()
        self.on_reject = on_reject

    def refresh(self, wait: bool = False) -> None:
        """Resolve the alias and load that version in the background if it is new."""
        t = threading.Thread(target=self._load_alias, daemon=True, name=f"load-{self.alias}")
        t.start()
        if wait:
            t.join()

    def _load_alias(self) -> None:
        if not self._loading.acquire(blocking=False):
            return
        try:
            seen = time.perf_counter()
            version = models.alias_version(self.s, self.alias)
            have = self._pending[0] if self._pending else self.current
            if version is None or (have and have.version == version) or version in self._bad:
                return
            try:
                scorer = models.load_scorer(self.s, version, self.features)
            except models.ModelCheckError as e:
                self._bad.add(version)
                MODEL_REJECTS.labels(check=e.check).inc()
                log.error("not serving %s v%s (%s): %s", self.alias, version, e.check, e)
                if self.on_reject:
                    self.on_reject(version, e.check, str(e))
                return
            self._pending = (scorer, seen)
            log.info("%s v%s loaded and verified (%s) in %.3fs", self.alias, version, scorer.runtime,
                     time.perf_counter() - seen)
        except Exception:  # a registry hiccup must not kill the poller; the next refresh retries
            log.exception("resolving %s failed", self.alias)
        finally:
            self._loading.release()

    def swap_if_ready(self) -> bool:
        """Called between batches: make the verified pending version current (one reference)."""
        pending = self._pending
        if pending is None:
            return False
        new, seen = pending
        self._pending = None
        old = self.current
        self.current = new
        SWAP_SECONDS.observe(time.perf_counter() - seen)
        if self.alias == models.CHAMPION:
            SERVING_VERSION.labels(model=new.name).set(float(new.version))
            SWAPS.labels(model=new.name).inc()
        log.info("%s: serving %s v%s (was %s)", self.alias, new.name, new.version, old.version if old else None)
        return True
