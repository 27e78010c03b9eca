"""The hot-swap slot of one model and alias: load + verify a pinned version in the background, swap one
reference between batches.

The scoring loop reads ``slot.current`` once per batch, so a batch is never scored by two versions and
no weights are ever copied into a live model. A version that fails verification is never made current
and never tried again once ``on_reject`` was told why (serving publishes ``models.rejected`` and waits for
the broker's ack; if that fails, the next refresh verifies and announces it again) and the slot keeps
what it serves. Any other load error (the registry or artifact store unreachable) is retried on the
next refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from driftloop.core.declarations import ModelSpec
from driftloop.core.metrics import MODEL_REJECTS, SERVING_VERSION, SWAP_SECONDS, SWAPS, StoreHealth
from driftloop.core.settings import Settings
from driftloop.registry.verify import ModelCheckError, Scorer, load_scorer
from driftloop.registry.versions import CHAMPION, alias_version

log = logging.getLogger(__name__)

RejectHook = Callable[[str, str, str], None]  # (version, check, message)
# every slot of the process reads the same registry
REGISTRY = StoreHealth("serving", "mlflow", "MLflow store unavailable (serving what is loaded; the alias is read "
                       "again on the next refresh)", "MLflow store answers again", log)


class ModelSlot:
    def __init__(self, settings: Settings, spec: ModelSpec, alias: str = CHAMPION,
                 on_reject: RejectHook | None = None):
        self.s = settings
        self.spec = spec
        self.alias = alias
        self.current: Scorer | None = None
        self._pending: tuple[Scorer, float] | None = None  # (scorer, when the alias was seen)
        self._loading = threading.Lock()
        self._bad: set[str] = set()
        self.on_reject = on_reject

    def refresh(self, wait: bool = False) -> threading.Thread:
        """Resolve the alias and load that version in the background if it is new (the loading thread)."""
        t = threading.Thread(target=self._load_alias, daemon=True, name=f"load-{self.spec.name}-{self.alias}")
        t.start()
        if wait:
            t.join()
        return t

    def _load_alias(self) -> None:
        if not self._loading.acquire(blocking=False):
            return
        name = self.spec.name
        try:
            seen = time.perf_counter()
            try:
                version = alias_version(self.s, name, self.alias)
            except Exception as e:  # noqa: BLE001 - the registry, not a version: retried on the next refresh
                REGISTRY.failed(e)
                return
            REGISTRY.ok()
            have = self._pending[0] if self._pending else self.current
            if version is None or (have and have.version == version) or version in self._bad:
                return
            try:
                scorer = load_scorer(self.s, name, version, list(self.spec.features), self.spec.task,
                                     self.spec.n_outputs, int8_tolerance=self.spec.int8_tolerance,
                                     max_score_s=self.s.serving_max_score_s)
            except ModelCheckError as e:
                MODEL_REJECTS.labels(model=name, check=e.check).inc()
                log.error("not serving %s %s v%s (%s): %s", name, self.alias, version, e.check, e)
                if self.on_reject:
                    self.on_reject(version, e.check, str(e))  # raises if not announced: tried again next refresh
                self._bad.add(version)
                return
            self._pending = (scorer, seen)
            log.info("%s %s v%s loaded and verified (%s) in %.3fs", name, self.alias, version, scorer.runtime,
                     time.perf_counter() - seen)
        except Exception:  # a registry hiccup is not the version's fault: the next refresh tries it again
            log.exception("loading %s %s failed; retrying on the next refresh", name, self.alias)
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
        SWAP_SECONDS.labels(model=self.spec.name).observe(time.perf_counter() - seen)
        if self.alias == CHAMPION:
            SERVING_VERSION.labels(model=new.name).set(float(new.version))
            SWAPS.labels(model=new.name).inc()
        log.info("%s %s: serving v%s (was %s)", new.name, self.alias, new.version, old.version if old else None)
        return True
