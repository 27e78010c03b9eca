"""Episodes and the request rules of the drift worker (``drift/episodes.py``, ``drift/state.py``), without a broker."""

from __future__ import annotations

from driftloop.drift.episodes import EpisodeTracker
from driftloop.drift.state import DAY_S, DriftState


def test_an_episode_starts_after_persist_and_ends_after_recover_windows():
    t = EpisodeTracker(persist_windows=2, recover_windows=2)
    verdicts = [True, False, True, True, True, False, True, False, False, True]
    assert [t.step(v) for v in verdicts] == [None, None, None, "start", None, None, None, None, "end", None]
    t.step(True)
    t.reset()
    assert not t.active and t.breached_run == 0


def test_requests_dedupe_in_flight_cooldown_budget_and_restart(tmp_path):
    db = tmp_path / "state.db"
    st = DriftState(db, in_flight_s=100)
    assert st.decide("m", "k1", 0, cooldown_s=10, budget_per_day=2) == ("go", None)
    st.record("r1", "m", "drift", "k1", 0)
    assert st.decide("m", "k1", 1, cooldown_s=10, budget_per_day=2) == ("duplicate", "r1")
    assert st.decide("m", "k2", 1, cooldown_s=10, budget_per_day=2) == ("in_flight", "r1")
    assert st.decide("m", "k2", 2, cooldown_s=None, budget_per_day=2) == ("duplicate", "r1")  # k2 now maps to r1
    assert st.decide("other", None, 2, cooldown_s=10, budget_per_day=2) == ("go", None)  # per model
    assert st.done("r1", "rejected", 5) and not st.done("r1", "rejected", 6)
    assert st.decide("m", None, 6, cooldown_s=10, budget_per_day=2) == ("cooldown", None)
    assert st.decide("m", None, 11, cooldown_s=10, budget_per_day=2) == ("go", None)
    st.record("r2", "m", "webhook", None, 11)
    st.close()
    st = DriftState(db, in_flight_s=100)  # a restart remembers everything
    assert st.decide("m", None, 50, cooldown_s=None, budget_per_day=2) == ("in_flight", "r2")
    assert st.decide("m", None, 112, cooldown_s=None, budget_per_day=2) == ("over_budget", None)  # r2 timed out
    assert st.decide("m", None, DAY_S + 1, cooldown_s=None, budget_per_day=2) == ("go", None)  # a day later
    assert [r["request_id"] for r in st.requests("m")] == ["r1", "r2"]
    st.save_episode("m", {"tracker": {"active": True}})
    assert st.episode("m") == {"tracker": {"active": True}} and st.episode("other") is None
    st.close()
