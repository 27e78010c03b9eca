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
