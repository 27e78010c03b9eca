"""The streams worker's batch bookkeeping (``streams.app``): batches wait for one commit (``Pending``: outputs
merged as if they were one batch, acks held until the commit), and the garbage-collector pacing (``Collector``:
long-lived objects are frozen after each batch, cyclic garbage is still reclaimed by a periodic full
collection)."""

from __future__ import annotations

import gc
import weakref

from driftloop.streams.app import COMMIT_RECORDS, Collector, Pending
from driftloop.streams.engine import WATERMARK_PREFIX, BatchOutput, Record


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


def _batch(offset: int, users: list[str]) -> BatchOutput:
    out = BatchOutput()
    rec = Record("t", 0, offset, None, b"{}")
    out.add_columns("bronze_t", {"user": list(users), "_offset": [offset] * len(users)})
    for u in users:
        out.states[f"user={u}"] = ({"_o": {"t:0": offset}}, rec)
    out.states[f"{WATERMARK_PREFIX}t|0"] = ({"wm": offset, "e": offset}, rec)  # last, as the engine adds it
    out.offsets[("t", 0)] = offset
    out.dlq.append((rec, "late", "x"))
    out.accepted = len(users)
    return out


def test_batches_merge_into_one_commit_with_the_newest_state_and_acks_held() -> None:
    pending, acked = Pending(), []
    assert not pending.due(0.0)  # nothing to commit
    pending.add(_batch(5, ["a", "b"]), lambda: acked.append(5))
    pending.add(_batch(9, ["b", "c"]), lambda: acked.append(9))
    assert pending.due(0.0) and not pending.due(3600.0)
    out, dones, n, online = pending.take()
    assert out.offline["bronze_t"] == {"user": ["a", "b", "b", "c"], "_offset": [5, 5, 9, 9]}
    assert list(out.states) == ["user=a", "user=b", "user=c", f"{WATERMARK_PREFIX}t|0"]  # the watermark record
    # last: written after every entity record it vouches for, so a kill -9 between them loses no event
    assert {k: st["_o"]["t:0"] for k, (st, _r) in out.states.items() if k.startswith("user=")} == {
        "user=a": 5, "user=b": 9, "user=c": 9}
    assert out.states[f"{WATERMARK_PREFIX}t|0"][0]["e"] == 9
    assert out.offsets == {("t", 0): 9} and len(out.dlq) == 2 and out.accepted == 4 and n == 6
    assert online is None  # no online write was given with the batches
    assert acked == []  # acks wait for the commit
    for done in dones:
        done()
    assert acked == [5, 9]
    assert not pending.done and not pending.out.offline and pending.records == 0


def test_a_large_backlog_commits_before_the_interval() -> None:
    pending = Pending()
    pending.add(_batch(1, [f"u{i}" for i in range(COMMIT_RECORDS)]), lambda: None)
    assert pending.due(3600.0)
