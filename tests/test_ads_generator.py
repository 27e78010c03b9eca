"""The example's traffic generator draws what ``numpy``'s ``rng.choice`` would, from cumulative sums made once."""

from __future__ import annotations

import numpy as np

from driftloop.examples.ads.ads_generator import COUNTRIES, AdTraffic


def test_each_pick_is_the_draw_rng_choice_makes_with_the_same_seed():
    g, twin = AdTraffic(seed=3), np.random.default_rng(3)
    for name, p in (("users", g.user_p), ("devices", (0.25, 0.6, 0.15)), ("devices_drifted", (0.7, 0.2, 0.1))):
        got = [g._pick(name) for _ in range(3000)]
        assert got == [int(twin.choice(len(p), p=p)) for _ in range(3000)], name
    assert [COUNTRIES[int(g.rng.integers(0, len(COUNTRIES)))] for _ in range(500)] == \
        [str(twin.choice(COUNTRIES)) for _ in range(500)]


def test_traffic_follows_the_declared_shares():
    g = AdTraffic(seed=5)
    events = [rec for i in range(20_000) for t, _k, rec in g.next(i) if t == "events.impressions"]
    devices = np.array([e["device"] for e in events])
    shares = [float(np.mean(devices == d)) for d in ("mobile", "desktop", "tablet")]
    assert np.allclose(shares, (0.25, 0.6, 0.15), atol=0.015)
    users = np.array([int(e["user_id"][1:]) for e in events])
    assert abs(np.mean(users == 0) - g.user_p[0]) < 0.01  # the most frequent user, as weighted
