"""The streams worker's garbage-collector pacing (``streams.app.Collector``): long-lived objects are frozen
after each batch, and cyclic garbage is still reclaimed by the periodic full collection."""

from __future__ import annotations

import gc
import weakref

from driftloop.streams.app import Collector


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_state_is_frozen_after_a_batch_and_cycles_are_still_reclaimed() -> None:
    gc.unfreeze()
    try:
        pacer = Collector(full_every_s=3600)
        kept = [{"b": {str(i): [1, 0.0, 0.0, 0.0]}} for i in range(1000)]
        pacer.batch_done()
        assert gc.get_freeze_count() >= len(kept)
        garbage = Node()
        gone = weakref.ref(garbage)
        del garbage
        pacer.batch_done()  # frozen now: no collection reaches it
        gc.collect()
        assert gone() is not None
        pacer.last_full -= 3600  # the full collection is due
        pacer.batch_done()
        assert gone() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
