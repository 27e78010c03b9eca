"""``driftloop bench drift``: one window's drift check against a cached reference vs plain Evidently, then
detection after an onset and false episodes on stationary traffic.

A seeded synthetic reference (``rows_ref`` rows; half numeric columns of several shapes, half categorical:
text labels and small integer codes) and windows of ``rows_window`` rows from the same generator.

- ``reference_stats_s``: summarising the reference once (``ReferenceCache`` computing it);
  ``reference_load_s``: another cache instance reading it back from disk.
- ``check_s``: median of 5 :func:`driftloop.drift.stats.check` runs on a stationary window (reference
  stats cached beforehand); ``evidently_check_s``: Evidently's ``DataDriftPreset`` on the same reference
  and window, in the same run (after an untimed warm-up on small frames); ``speedup`` their ratio.
- ``detect_windows``: at the onset, 60% of the columns shift (numeric: mean + 0.25 std; categorical: 30% of
  the mass moves to the reversed distribution); the number of windows after the onset until an episode
  starts (1 = the first window), None when none starts within 10. ``false_episodes``: episodes started
  over 50 stationary windows. Both use ``EpisodeTracker(persist_windows=1)`` (the harshest setting: one
  breached window starts an episode) and the default drift share threshold of a model declaration.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from driftloop.bench.common import report
from driftloop.core.declarations import DriftPolicy
from driftloop.drift.episodes import EpisodeTracker
from driftloop.drift.stats import ReferenceCache, check

LABELS = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
SHIFT_SHARE = 0.6
T = TypeVar("T")


class Traffic:
    """Seeded synthetic rows: ``columns`` columns, the first half numeric, the rest categorical."""

    def __init__(self, columns: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.numeric = [f"num_{i}" for i in range(columns // 2)]
        self.categorical = [f"cat_{i}" for i in range(columns - columns // 2)]
        shift_n = round(SHIFT_SHARE * len(self.numeric))
        shift_c = round(SHIFT_SHARE * len(self.categorical))
        self.shifted = set(self.numeric[:shift_n] + self.categorical[:shift_c])

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    def rows(self, n: int, drifted: bool = False) -> pd.DataFrame:
        rng, out = self.rng, {}
        for i, c in enumerate(self.numeric):
            x = (rng.normal(10 + i, 1 + i % 3, n), rng.lognormal(0, 0.75, n), rng.exponential(2.0, n),
                 rng.gamma(2.0, 1.5, n), rng.uniform(0, 100, n))[i % 5]
            out[c] = x + 0.25 * np.std(x) if drifted and c in self.shifted else x
        for i, c in enumerate(self.categorical):
            k = 3 + i % 6
            p = 1.0 / np.arange(1, k + 1) ** 1.2
            p /= p.sum()
            if drifted and c in self.shifted:
                p = 0.7 * p + 0.3 * p[::-1]
            codes = rng.choice(k, n, p=p)
            out[c] = LABELS[codes] if i % 2 == 0 else codes.astype(np.int64)
        return pd.DataFrame(out)


def evidently_check(ref: pd.DataFrame, win: pd.DataFrame, columns: list[str]) -> float:
    """Plain Evidently: a DataDriftPreset report on the frames; its drifted-column share."""
    from evidently import Report  # noqa: PLC0415 - heavy
    from evidently.presets import DataDriftPreset  # noqa: PLC0415

    snap = Report([DataDriftPreset(columns=columns)]).run(current_data=win, reference_data=ref)
    return next(float(m["value"]["share"]) for m in snap.dict()["metrics"]
                if m["config"]["type"].endswith("DriftedColumnsCount"))


def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` and its wall time, seconds."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(rows_ref: int = 100_000, rows_window: int = 10_000, columns: int = 20, seed: int = 0) -> dict:
    """Run the benchmark; prints progress and, last, the result as one JSON line."""
    traffic = Traffic(columns, seed)
    cols = traffic.columns
    ref = traffic.rows(rows_ref)
    win = traffic.rows(rows_window)
    threshold = DriftPolicy().share_threshold
    print(f"reference {rows_ref} rows × {len(cols)} columns ({len(traffic.numeric)} numeric), window {rows_window}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = ReferenceCache(Path(tmp))
        stats, ref_s = timed(cache.get, "bench", "1", lambda: ref, cols)
        _, load_s = timed(ReferenceCache(Path(tmp)).get, "bench", "1", lambda: ref, cols)
    assert cache.computed == 1
    print(f"reference stats: {ref_s:.3f}s to compute, {load_s:.3f}s to read back from the cache")
    check(stats, win)  # warm-up
    runs = [timed(check, stats, win)[1] for _ in range(5)]
    ours = check(stats, win)
    check_s = statistics.median(runs)
    print(f"check: {check_s * 1e3:.1f} ms (runs {', '.join(f'{r * 1e3:.1f}' for r in runs)}); share {ours.share:.2f}")
    evidently_check(ref.head(1000), win.head(500), cols)  # warm-up: imports, registries
    ev_share, ev_s = timed(evidently_check, ref, win, cols)
    print(f"evidently DataDriftPreset: {ev_s:.2f}s; share {ev_share:.2f}")

    tracker = EpisodeTracker(persist_windows=1, recover_windows=DriftPolicy().persist_windows)
    pre_onset = sum(tracker.step(check(stats, traffic.rows(rows_window)).share >= threshold) == "start"
                       for _ in range(3))
    detect: int | None = None
    onset_shares = []
    for i in range(1, 11):
        res = check(stats, traffic.rows(rows_window, drifted=True))
        onset_shares.append(round(res.share, 3))
        if tracker.step(res.share >= threshold) == "start":
            detect = i
            break
    print(f"onset ({len(traffic.shifted)} of {len(cols)} columns shift): detected after {detect} window(s), "
          f"shares {onset_shares}")
    stationary = EpisodeTracker(persist_windows=1, recover_windows=DriftPolicy().persist_windows)
    shares = [check(stats, traffic.rows(rows_window)).share for _ in range(50)]
    false_episodes = sum(stationary.step(s >= threshold) == "start" for s in shares)
    print(f"50 stationary windows: {false_episodes} episodes; max share {max(shares):.2f}")
    result = {
        "bench": "drift", "rows_ref": rows_ref, "rows_window": rows_window, "columns": len(cols), "seed": seed,
        "reference_stats_s": round(ref_s, 4), "reference_load_s": round(load_s, 4), "check_s": round(check_s, 4),
        "evidently_check_s": round(ev_s, 3), "speedup": round(ev_s / check_s, 1), "share": ours.share,
        "evidently_share": ev_share, "share_threshold": threshold, "persist_windows": 1,
        "detect_windows": detect, "onset_shares": onset_shares, "shifted_columns": len(traffic.shifted),
        "false_episodes": false_episodes, "pre_onset_episodes": pre_onset, "stationary_max_share": max(shares),
    }
    report(result)
    return result


if __name__ == "__main__":
    run()
