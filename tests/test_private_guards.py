"""Guards for the private library internals driftloop still patches: each test fails with a clear message on a
library version its patch was not written for, so an upgrade re-checks the patch instead of silently running a
stale copy of someone else's code."""

from __future__ import annotations

from driftloop.streams import faust_patches


def test_faust_patches_match_the_installed_faust_and_aiokafka():
    """streams/faust_patches.py copies Faust's private ``Consumer._drain_messages`` and rebinds
    ``aiokafka.AIOKafkaConsumer``: the installed versions, the patched attributes' signatures and the
    source of the Faust code the copy was taken from must be the ones it was written for."""
    problems = faust_patches.problems()
    assert not problems, faust_patches.guard_message(problems)


def test_the_guard_notices_another_version(monkeypatch):
    """The guard itself: a different installed version is reported, with what to do."""
    monkeypatch.setitem(faust_patches.WRITTEN_FOR, "faust-streaming", "0.0.1")
    problems = faust_patches.problems()
    assert any("faust-streaming" in p for p in problems)
    message = faust_patches.guard_message(problems)
    assert message.startswith("streams/faust_patches.py was written for faust-streaming 0.0.1 / aiokafka ")
    assert "re-check the patch" in message


def test_observe_many_matches_prometheus_clients_own_observe():
    """serving/worker.py ``observe_many`` updates a histogram through prometheus_client's private ``_upper_bounds``,
    ``_buckets`` and ``_sum`` (written for 0.24.1): on the installed version they must exist and give exactly what
    the public ``observe`` gives, value by value."""
    from importlib.metadata import version

    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from driftloop.serving.worker import observe_many

    values = np.random.default_rng(0).lognormal(-3, 1.5, 2000)
    got, want = CollectorRegistry(), CollectorRegistry()
    h_got, h_want = (Histogram("h", "x", registry=r) for r in (got, want))
    assert all(hasattr(h_got, a) for a in ("_upper_bounds", "_buckets", "_sum")), (
        f"prometheus_client {version('prometheus_client')} lacks the internals observe_many was written for "
        "(0.24.1): re-check serving/worker.py observe_many")
    observe_many(h_got, values)
    for v in values.tolist():
        h_want.observe(v)
    lines = [[ln for ln in generate_latest(r).decode().splitlines() if "bucket" in ln or "count" in ln]
             for r in (got, want)]
    assert lines[0] == lines[1]
