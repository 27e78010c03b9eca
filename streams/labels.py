"""The label joiner: an impression gets label 1 if its click arrives within the label window.

State per impression id lives in a changelog-backed table: ``{"u": user, "ts": µs, "c": 0|1, "p": part}``.
A label is decided once the partition's event-time watermark passes ``ts + label_window``.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any


class LabelJoiner:
    def __init__(self, window_s: float):
        self.window_us = int(window_s * 1_000_000)
        self.heaps: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self.rebuilt = False

    def rebuild(self, pending: Any) -> None:
        """After a restart, re-index impressions recovered into the table."""
        for iid, st in pending.items():
            if st and "ts" in st:
                heapq.heappush(self.heaps[st["p"]], (st["ts"] + self.window_us, iid))
        self.rebuilt = True

    def on_impression(self, pending: Any, iid: str, user: str, ts: int, partition: int) -> None:
        st = pending.get(iid) or {}
        pending[iid] = {"u": user, "ts": ts, "c": st.get("c", 0), "p": partition}
        heapq.heappush(self.heaps[partition], (ts + self.window_us, iid))

    def on_click(self, pending: Any, iid: str, click_ts: int) -> None:
        st = pending.get(iid)
        if st is None:  # click seen before its impression (other topic ran ahead)
            pending[iid] = {"c": 1, "click_ts": click_ts}
        elif "ts" not in st or click_ts - st["ts"] <= self.window_us:
            pending[iid] = {**st, "c": 1}

    def due(self, pending: Any, partition: int, watermark_us: int) -> list[tuple[str, dict[str, Any]]]:
        """Pop impressions whose label window closed; the caller deletes them from the table."""
        out = []
        heap = self.heaps[partition]
        while heap and heap[0][0] <= watermark_us:
            _, iid = heapq.heappop(heap)
            st = pending.get(iid)
            if st and "ts" in st:
                out.append((iid, st))
        return out
