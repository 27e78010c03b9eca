"""Synthetic ad traffic with a known click model, and a drift switch.

Before the drift: bids ~ lognormal(0, 0.35), mostly desktop, click logit favours top positions and
high bids. From the ``drift_at``-th event: bids shift up, mobile dominates, and the click model flips
(lower positions and low bids get clicked), so a model trained before the drift scores badly after it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from driftloop.infra.contracts import Click, Impression, new_id, now_us
from driftloop.infra.kafka import flush_or_raise, make_producer, produce_event, produce_raw
from driftloop.infra.settings import Settings

log = logging.getLogger(__name__)

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


@dataclass
class TrafficGenerator:
    """Deterministic for a seed; ``drift_at`` may be moved while running (the demo does)."""

    seed: int = 7
    users: int = 2000
    drift_at: int | None = None
    produced: int = 0
    clicks: int = 0
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        w = 1.0 / np.arange(1, self.users + 1) ** 0.8
        self.user_p = w / w.sum()

    @property
    def drifted(self) -> bool:
        return self.drift_at is not None and self.produced >= self.drift_at

    def next(self, ts: int) -> tuple[Impression, Click | None]:
        r = self.rng
        d = self.drifted
        user = f"u{r.choice(self.users, p=self.user_p)}"
        device = str(r.choice(DEVICES, p=(0.7, 0.2, 0.1) if d else (0.25, 0.6, 0.15)))
        position = int(r.integers(1, 6))
        bid = float(round(r.lognormal(0.45 if d else 0.0, 0.35), 4))
        imp = Impression(event_id=new_id(), ts=ts, user_id=user, ad_id=f"a{r.integers(200)}",
                         campaign_id=f"c{r.integers(20)}", device=device,  # type: ignore[arg-type]
                         country=str(r.choice(COUNTRIES)), position=position, bid=bid)
        self.produced += 1
        click = None
        if r.random() < click_probability(position, bid, device, d):
            self.clicks += 1
            click = Click(ts=ts + int(r.uniform(0.05, 2.0) * 1e6), impression_id=imp.event_id,
                          user_id=user, ad_id=imp.ad_id)
        return imp, click


def produce(settings: Settings, rate: float, count: int | None = None, duration: float | None = None,
            seed: int = 7, drift_at: int | None = None, generator: TrafficGenerator | None = None,
            should_stop: Callable[[], bool] = lambda: False, progress: bool = True) -> TrafficGenerator:
    """Publish impressions (and their clicks) at ``rate`` events/s until count/duration/should_stop."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if count is None and duration is None:
        raise ValueError("give --count or --duration")
    gen = generator or TrafficGenerator(seed=seed, drift_at=drift_at)
    producer = make_producer(settings)
    start = time.monotonic()
    last_report = start
    tick = 0.02
    while not should_stop():
        elapsed = time.monotonic() - start
        if (count is not None and gen.produced >= count) or (duration is not None and elapsed >= duration):
            break
        due = int(elapsed * rate) + 1 - gen.produced
        if count is not None:
            due = min(due, count - gen.produced)
        for _ in range(max(0, due)):
            imp, click = gen.next(now_us())
            produce_event(producer, settings, "events.impressions", imp, imp.user_id)
            if click:
                produce_event(producer, settings, "events.clicks", click, click.user_id)
        producer.poll(0)
        if progress and time.monotonic() - last_report >= 5:
            last_report = time.monotonic()
            log.info("produced %d impressions, %d clicks (%.0f/s)%s", gen.produced, gen.clicks,
                     gen.produced / max(elapsed, 1e-9), " [drifted]" if gen.drifted else "")
        time.sleep(tick)
    flush_or_raise(producer)
    return gen


def synthetic_events(n: int, *, users: int = 5000, start_us: int | None = None, rate: float = 5000.0,
                     disorder_s: float = 0.0, click_share: float = 0.2, seed: int = 0) -> list[tuple[str, dict]]:
    """``n`` impressions and about ``click_share * n`` clicks as ``(logical topic, record)``, in send order.

    Vectorised (hundreds of thousands per second) for benchmarks and tests. Records are sent as if
    ``rate`` impressions/s arrived from ``start_us`` on; each event time lags its send time by up to
    ``disorder_s`` (out of order within that bound); a click follows its impression by 0.05–2 s.
    """
    r = np.random.default_rng(seed)
    start = start_us if start_us is not None else now_us()
    w = 1.0 / np.arange(1, users + 1) ** 0.8
    uid = r.choice(users, size=n, p=w / w.sum())
    send = start + (np.arange(n) * 1e6 / rate).astype(np.int64)
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


def publish(settings: Settings, records: list[tuple[str, dict]] | list[tuple[str, bytes, bytes]],
            rate: float | None = None, **producer_config: Any) -> int:
    """Send ``(logical topic, record)`` or ``(logical topic, key, raw value)`` items in order, keyed by
    ``user_id``; paced at ``rate`` records/s when given. Returns the count once every record is acked."""
    producer = make_producer(settings, **producer_config)
    names = {t: settings.topic(t) for t in {x[0] for x in records}}
    start = time.monotonic()
    for i, item in enumerate(records):
        if len(item) == 2:
            topic, rec = item
            key, value = str(rec["user_id"]).encode(), orjson.dumps(rec)
        else:
            topic, key, value = item
        produce_raw(producer, names[topic], key, value)
        if rate and i % 100 == 0:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
            producer.poll(0)
    flush_or_raise(producer)
    return len(records)
