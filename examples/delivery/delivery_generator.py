"""Synthetic delivery traffic with a known delivery-time model and a drift switch (``driftloop produce``, the demo).

Before the drift: distances ~ lognormal around 2.5 km, about a third of the orders in peak hours, and
the minutes grow with distance and items, scaled by the courier's own speed. From the ``drift_at``-th
order on (think of road works across the city): orders come from farther away, mostly in peak hours,
every kilometre takes much longer and peak hours add far more, so a model trained before the drift
underestimates badly.

Every order is followed 1-3 s later (event time) by its delivery, except about 2 % cancelled orders,
which never get a label.
"""

from __future__ import annotations

import uuid

import numpy as np

ZONES = ("center", "north", "south", "east", "west")
PEAK_HOURS = (11, 12, 13, 18, 19, 20)
HOURS = np.arange(8, 23)
CANCELLED = 0.02


def delivery_minutes(distance_km: float, items: int, hour: int, speed: float, drifted: bool) -> float:
    """The ground-truth expected delivery time (the generator adds noise)."""
    peak = 1.0 if hour in PEAK_HOURS else 0.0
    if not drifted:
        return speed * (6.0 + 2.4 * distance_km + 0.8 * items) + 5.0 * peak
    return speed * (9.0 + 4.0 * distance_km + 0.3 * items) + 14.0 * peak


def _hour_weights(peak_share: float) -> np.ndarray:
    peak = np.isin(HOURS, PEAK_HOURS)
    return np.where(peak, peak_share / peak.sum(), (1 - peak_share) / (~peak).sum())


class DeliveryTraffic:
    """Deterministic for a seed; ``drift_at`` may be moved while running (the demo does)."""

    def __init__(self, seed: int = 7, drift_at: int | None = None, couriers: int = 300):
        self.rng = np.random.default_rng(seed)
        self.drift_at = drift_at
        self.produced = 0
        self.couriers = np.arange(1000, 1000 + couriers)
        w = 1.0 / np.arange(1, couriers + 1) ** 0.6
        self.courier_p = w / w.sum()
        self.speed = self.rng.uniform(0.8, 1.25, couriers)  # a courier's minutes multiplier
        self.hours = {False: _hour_weights(0.35), True: _hour_weights(0.7)}

    @property
    def drifted(self) -> bool:
        return self.drift_at is not None and self.produced >= self.drift_at

    def next(self, ts: int) -> list[tuple[str, str, dict]]:
        """One order (and its delivery, unless cancelled) as ``(logical topic, key, record)``."""
        r, d = self.rng, self.drifted
        i = int(r.choice(len(self.couriers), p=self.courier_p))
        courier = int(self.couriers[i])
        distance = float(round(r.lognormal(np.log(4.5 if d else 2.5), 0.45 if d else 0.5), 3))
        items = 1 + int(r.poisson(1.0 if d else 1.5))
        hour = int(r.choice(HOURS, p=self.hours[d]))
        oid = uuid.uuid4().hex  # unique across runs: two `driftloop produce` of one seed never repeat an id
        out = [("events.orders", str(courier), {
            "schema_version": 1, "event_id": oid, "ts": ts, "courier_id": courier, "zone": str(r.choice(ZONES)),
            "distance_km": distance, "items": items, "hour": hour})]
        self.produced += 1
        if r.random() >= CANCELLED:
            noise = r.normal(0.0, 2.0 if d else 1.5)
            minutes = delivery_minutes(distance, items, hour, float(self.speed[i]), d) + noise
            out.append(("events.deliveries", str(courier), {
                "schema_version": 1, "event_id": f"d{oid}", "ts": ts + int(r.uniform(1.0, 3.0) * 1e6),
                "courier_id": courier, "order_id": oid, "minutes": round(max(1.0, minutes), 2)}))
        return out
