"""Drift episodes: a run of breached windows, not a single window, is what asks for a retrain.

An episode starts with the ``persist_windows``-th breached window in a row and ends after
``recover_windows`` healthy windows in a row. While it lasts, further breaches change nothing, so one
episode is one retraining request (the monitor decides when that request may go out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Transition = Literal["start", "end"]


@dataclass
class EpisodeTracker:
    persist_windows: int = 2
    recover_windows: int = 3
    active: bool = False
    breached_run: int = 0  # consecutive breached windows so far
    healthy_run: int = 0  # consecutive healthy windows so far (inside an episode)

    def step(self, breached: bool) -> Transition | None:
        """Feed one window's verdict; "start" when an episode starts, "end" when one ends, else None."""
        if breached:
            self.breached_run, self.healthy_run = self.breached_run + 1, 0
            if not self.active and self.breached_run >= self.persist_windows:
                self.active = True
                return "start"
            return None
        self.breached_run = 0
        if self.active:
            self.healthy_run += 1
            if self.healthy_run >= self.recover_windows:
                self.active, self.healthy_run = False, 0
                return "end"
        return None

    def reset(self) -> None:
        """Forget the runs (a new model version has its own reference)."""
        self.active, self.breached_run, self.healthy_run = False, 0, 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
