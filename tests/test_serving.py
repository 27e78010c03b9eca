"""Serving through the real broker and MLflow store: hot swaps under load (audited), shadow scoring,
rollback through the CLI, every kind of bad model refused while the champion serves on, and a
SIGKILL mid-stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import orjson
from confluent_kafka import Consumer, TopicPartition

from driftloop.bench.model_fixtures import BAD_KINDS, register_bad, register_good
from driftloop.bench.serving import audit, read_all, source_offsets
from driftloop.features.repo import apply
from driftloop.registry import models
from driftloop.core.kafka import consumer_config, make_producer
from driftloop.app.producer import produce
from driftloop.core.settings import Settings
from driftloop.app.supervisor import Child, settings_env
from tests.helpers import wait_for, worker


def _preds(s: Settings, topic: str = "predictions", n: int = 10**9, timeout: float = 0) -> list[dict]:
    """The records on a topic now (or, with ``timeout``, once ``n`` arrived or the topic went quiet)."""
    return [orjson.loads(m.value()) for m in read_all(s, topic, n, timeout, idle_s=0.5)]


def _champion(s: Settings, seed: int = 1) -> str:
    apply(s)
    return models.promote(s, make_producer(s), register_good(s, seed=seed), reason="test").version


def test_swaps_under_load_shadow_and_rollback(settings: Settings):
    v1 = _champion(settings)
    producer = make_producer(settings)
    with worker(settings, "serving"):
        stop, box = threading.Event(), {}
        t = threading.Thread(target=lambda: box.update(g=produce(settings, rate=800, duration=60, seed=3,
                                                                 progress=False, should_stop=stop.is_set)))
        t.start()
        try:
            v2 = register_good(settings, seed=2)  # becomes the challenger: shadow-scored beside v1
            wait_for(lambda: any(p["model_version"] == v2 for p in _preds(settings, "predictions.shadow")), 30)
            swaps = [v2] + [register_good(settings, seed=10 + i, challenger=False) for i in range(3)]
            for v in swaps:
                models.promote(settings, producer, v, reason="test")
                wait_for(lambda v=v: any(p["model_version"] == v for p in _preds(settings)), 15)
            r = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "rollback", settings.model_name],
                               env=settings_env(settings), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
            assert models.alias_version(settings) == swaps[-2]
            wait_for(lambda: _preds(settings)[-1]["model_version"] == swaps[-2], 15)
        finally:
            stop.set()
            t.join()
        imps = source_offsets(settings, box["g"].produced)
        preds = _preds(settings, n=len(imps), timeout=60)
    result = audit(settings, set(imps), preds)
    assert (result["lost"], result["duplicated"], result["misversioned"], result["unexpected"]) == (0, 0, 0, 0), result
    assert result["versions"] == [v1, *swaps]
    shadow = _preds(settings, "predictions.shadow")
    assert shadow and audit(settings, {p["event_id"] for p in shadow}, shadow)["misversioned"] == 0


def test_bad_models_are_refused_while_the_champion_serves(settings: Settings):
    v1 = _champion(settings)
    producer = make_producer(settings)
    with worker(settings, "serving"):
        produced = 0
        for kind in BAD_KINDS:
            bad = register_bad(settings, kind)
            models.promote(settings, producer, bad, reason="test")
            wait_for(lambda bad=bad: any(r["version"] == bad for r in _preds(settings, "models.rejected")), 30)
            produced += produce(settings, rate=500, count=200, seed=produced, progress=False).produced
            preds = wait_for(lambda n=produced: (p := _preds(settings)) and len(p) >= n and p, 30)
            assert {p["model_version"] for p in preds} == {v1}, kind
    rejected = {r["version"]: r["checks"] for r in _preds(settings, "models.rejected")}
    checks = [next(k for k in rejected[v] if k.startswith("serving_verification.")) for v in sorted(rejected, key=int)]
    assert checks == ["serving_verification.outputs", "serving_verification.signature",
                      "serving_verification.checksum", "serving_verification.signature"]


def test_sigkill_mid_stream_loses_nothing(settings: Settings):
    _champion(settings)
    gen = produce(settings, rate=20_000, count=60_000, seed=5, progress=False)  # a backlog serving needs seconds for
    child = Child("serving", settings_env(settings), settings.root / "serving.log")
    child.start()
    wait_for(lambda: len(_preds(settings)) >= 3000, 120, every=0.2)
    child.signal_group(signal.SIGKILL)
    child.proc.wait()
    group = Consumer(consumer_config(settings, f"{settings.topic_prefix}serving"))
    committed = {tp.partition: tp.offset for tp in group.committed(
        [TopicPartition(settings.topic("events.impressions"), p) for p in range(settings.partitions)], timeout=10)}
    group.close()
    before = len(_preds(settings))
    assert before < gen.produced, "the kill came too late to test anything"
    (settings.run_dir / "serving.ready").unlink(missing_ok=True)
    child.start()
    try:
        imps = source_offsets(settings, gen.produced)
        wait_for(lambda: len({p["event_id"] for p in _preds(settings)}) >= len(imps), 120, every=1.0)
    finally:
        child.stop()
    preds = _preds(settings)
    result = audit(settings, set(imps), preds)
    assert result["lost"] == 0 and result["misversioned"] == 0, result
    seen: dict[str, int] = {}
    for p in preds:
        seen[p["event_id"]] = seen.get(p["event_id"], 0) + 1
    dups = [imps[e] for e, n in seen.items() if n > 1]
    assert all(off >= committed[part] for part, off in dups), "a record before the last commit was scored twice"
