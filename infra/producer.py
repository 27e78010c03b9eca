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

import numpy as np

from driftloop.infra.contracts import Click, Impression, new_id, now_us
from driftloop.infra.kafka import flush_or_raise, make_producer, produce_event
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
