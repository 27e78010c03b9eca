"""Synthetic ad traffic with a known click model and a drift switch (for ``driftloop produce`` and the demo).

Before the drift: bids ~ lognormal(0, 0.35), mostly desktop, the click logit favours top positions and
high bids. From the ``drift_at``-th impression on: bids shift up, mobile dominates, and the click model
flips (lower positions and low bids get clicked), so a model trained before the drift scores badly.
"""

from __future__ import annotations

import math
import time
import uuid

import numpy as np

DEVICES = ("mobile", "desktop", "tablet")
COUNTRIES = ("US", "DE", "IN", "BR")


def click_probability(position: int, bid: float, device: str, drifted: bool) -> float:
    """The ground-truth click model."""
    mobile = 1.0 if device == "mobile" else 0.0
    if not drifted:
        logit = -0.6 - 0.55 * (position - 1) + 1.2 * (bid - 1.0) + 0.4 * mobile
    else:
        logit = -2.6 + 0.55 * (position - 1) - 1.2 * (bid - 1.6) - 0.6 * mobile
    return 1.0 / (1.0 + math.exp(-logit))


class AdTraffic:
    """Deterministic for a seed; ``drift_at`` may be moved while running (the demo does)."""

    def __init__(self, seed: int = 7, drift_at: int | None = None, users: int = 2000):
        self.rng = np.random.default_rng(seed)
        self.drift_at = drift_at
        self.users = users
        self.produced = 0
        w = 1.0 / np.arange(1, users + 1) ** 0.8
        self.user_p = w / w.sum()
        # ``rng.choice(a, p=p)`` draws one uniform and searches p's normalised cumulative sums, which it
        # recomputes every call (most of a record's cost with 2000 users): the same draw on sums made once
        self._cdf = {name: _cdf(p) for name, p in (("users", self.user_p), ("devices", (0.25, 0.6, 0.15)),
                                                     ("devices_drifted", (0.7, 0.2, 0.1)))}

    @property
    def drifted(self) -> bool:
        return self.drift_at is not None and self.produced >= self.drift_at

    def next(self, ts: int) -> list[tuple[str, str, dict]]:
        """One impression (and its click, if any) as ``(logical topic, key, record)``."""
        r, d = self.rng, self.drifted
        user = f"u{self._pick('users')}"
        device = DEVICES[self._pick("devices_drifted" if d else "devices")]
        position = int(r.integers(1, 6))
        bid = float(round(r.lognormal(0.45 if d else 0.0, 0.35), 4))
        iid = uuid.uuid4().hex  # unique across runs: two `driftloop produce` of one seed never repeat an id
        ad = f"a{r.integers(200)}"
        out = [("events.impressions", user, {
            "schema_version": 1, "event_id": iid, "ts": ts, "user_id": user, "ad_id": ad,
            "campaign_id": f"c{r.integers(20)}", "device": device,
            "country": COUNTRIES[int(r.integers(0, len(COUNTRIES)))],
            "position": position, "bid": bid})]
        self.produced += 1
        if r.random() < click_probability(position, bid, device, d):
            out.append(("events.clicks", user, {
                "schema_version": 1, "event_id": f"k{iid}", "ts": ts + int(r.uniform(0.05, 2.0) * 1e6),
                "impression_id": iid, "user_id": user, "ad_id": ad}))
        return out

    def _pick(self, name: str) -> int:
        """The index ``rng.choice`` with these probabilities draws (the same draw, the same result)."""
        return int(self._cdf[name].searchsorted(self.rng.random(), side="right"))


def _cdf(p: object) -> np.ndarray:
    cdf = np.asarray(p, dtype=np.float64).cumsum()
    return cdf / cdf[-1]


def synthetic_events(n: int, *, users: int = 5000, start_us: int | None = None, rate: float = 5000.0,
                     disorder_s: float = 0.0, click_share: float = 0.2, seed: int = 0) -> list[tuple[str, dict]]:
    """``n`` impressions and about ``click_share * n`` clicks as ``(logical topic, record)``, in send order.

    Vectorised (hundreds of thousands per second) for benchmarks and tests. Records are sent as if
    ``rate`` impressions/s arrived from ``start_us`` on; each event time lags its send time by up to
    ``disorder_s`` (out of order within that bound); a click follows its impression by 0.05-2 s.
    """
    r = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, users + 1) ** 0.8
    uid = r.choice(users, size=n, p=w / w.sum())
    send = (time.time_ns() // 1000 if start_us is None else start_us) + (np.arange(n) * 1e6 / rate).astype(np.int64)
    ts = send - (r.uniform(0, disorder_s, n) * 1e6).astype(np.int64)
    pos = r.integers(1, 6, n)
    bid = np.round(r.lognormal(0.0, 0.35, n), 4)
    dev = r.choice(len(DEVICES), size=n, p=(0.25, 0.6, 0.15))
    ctry = r.integers(0, len(COUNTRIES), n)
    ad = r.integers(0, 200, n)
    ids = [f"{seed:x}-{i:x}" for i in range(n)]
    out: list[tuple[int, str, dict]] = []
    for i in range(n):
        out.append((int(send[i]), "events.impressions", {
            "schema_version": 1, "event_id": ids[i], "ts": int(ts[i]), "user_id": f"u{uid[i]}", "ad_id": f"a{ad[i]}",
            "campaign_id": f"c{ad[i] % 20}", "device": DEVICES[dev[i]], "country": COUNTRIES[ctry[i]],
            "position": int(pos[i]), "bid": float(bid[i])}))
    clicked = np.flatnonzero(r.random(n) < click_share)
    delay = (r.uniform(0.05, 2.0, len(clicked)) * 1e6).astype(np.int64)
    lag = (r.uniform(0, disorder_s, len(clicked)) * 1e6).astype(np.int64)
    for i, d, g in zip(clicked, delay, lag, strict=True):
        out.append((int(send[i] + d), "events.clicks", {
            "schema_version": 1, "event_id": f"k{ids[i]}", "ts": int(send[i] + d - g), "impression_id": ids[i],
            "user_id": f"u{uid[i]}", "ad_id": f"a{ad[i]}"}))
    out.sort(key=lambda x: x[0])
    return [(topic, rec) for _, topic, rec in out]
