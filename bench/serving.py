"""``driftloop bench serving`` and ``driftloop bench swap``, and the prediction audit both share with
the tests.

* serving: one serving process over a backlog of impressions whose users have online features
  (the streams worker computed them first) → predictions/s including the feature lookup; then
  impressions at a fixed rate → p99 event → prediction latency.
* swap: impressions at a fixed rate while the champion alias moves ``--swaps`` times; afterwards every
  prediction is re-scored by the version it names, for the feature vector it carries.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition

from driftloop.bench.common import broker, isolated, report, running
from driftloop.bench.model_fixtures import register_good
from driftloop.features.repo import apply
from driftloop.features.vectors import FEATURE_COLUMNS
from driftloop.registry import models
from driftloop.core.contracts import now_us
from driftloop.core.kafka import consumer_config, good_messages, make_producer
from driftloop.app.producer import produce, publish, synthetic_events
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


def read_all(settings: Settings, topic: str, until: int, timeout: float, idle_s: float = 5.0) -> list[Any]:
    """Records of a logical topic from the beginning: until ``until`` records were read, or, after
    ``timeout``, once the ends seen at the start are reached or nothing arrived for ``idle_s``."""
    c = Consumer(consumer_config(settings, f"audit-{uuid.uuid4().hex}"))
    try:
        full = settings.topic(topic)
        ends = {p: c.get_watermark_offsets(TopicPartition(full, p), timeout=10)[1] for p in range(settings.partitions)}
        c.assign([TopicPartition(full, p, 0) for p in ends])
        out: list[Any] = []
        pos = dict.fromkeys(ends, 0)
        deadline, last = time.monotonic() + timeout, time.monotonic()
        while len(out) < until:
            got = good_messages(c.consume(10_000, 0.3))
            out += got
            for m in got:
                pos[m.partition()] = m.offset() + 1
            now = time.monotonic()
            last = now if got else last
            if now > deadline and (now - last > idle_s or all(pos[p] >= e for p, e in ends.items())):
                break
        return out
    finally:
        c.close()


def source_offsets(settings: Settings, n: int, timeout: float = 60) -> dict[str, tuple[int, int]]:
    """event_id → (partition, offset) of the impressions on the topic."""
    out = {}
    for m in read_all(settings, "events.impressions", n, timeout):
        try:
            out[orjson.loads(m.value())["event_id"]] = (m.partition(), m.offset())
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def audit(settings: Settings, event_ids: set[str], preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Lost, duplicated and mis-versioned predictions: each prediction is re-scored by the version it
    names, on the feature vector it carries (atol 1e-5)."""
    per_event = Counter(p["event_id"] for p in preds)
    by_version: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        by_version[p["model_version"]].append(p)
    misversioned = 0
    for version, ps in by_version.items():
        scorer = models.load_scorer(settings, version, FEATURE_COLUMNS, name=ps[0]["model_name"],
                                    verify_reference=False)
        x = np.array([[p["features"][c] for c in FEATURE_COLUMNS] for p in ps], np.float32)
        want = np.clip(scorer.score(x), 0.0, 1.0)
        got = np.array([p["score"] for p in ps])
        misversioned += int(np.sum(~np.isclose(got, want, atol=1e-5, rtol=0)))
    return {"predictions": len(preds), "lost": len(event_ids - set(per_event)),
            "duplicated": sum(n - 1 for n in per_event.values() if n > 1),
            "unexpected": len(set(per_event) - event_ids), "misversioned": misversioned,
            "versions": sorted(by_version, key=int)}


def scored_at(p: dict[str, Any]) -> float:
    """When the prediction was made (event time + its latency), epoch seconds."""
    return p["ts"] / 1e6 + p["latency_s"]


def swap_timings(preds: list[dict[str, Any]], promotions: list[tuple[str, float]]) -> dict[str, float]:
    """Per promotion (version, alias-moved time): the scoring pause around the swap (last prediction
    of the old version → first of the new) and alias move → first prediction of the new version."""
    first: dict[str, float] = {}
    for p in preds:
        t = scored_at(p)
        first[p["model_version"]] = min(first.get(p["model_version"], t), t)
    pauses, delays = [], []
    for version, moved in promotions:
        if version not in first:
            continue
        new_t = first[version]
        before = [scored_at(p) for p in preds if p["model_version"] != version and scored_at(p) <= new_t]
        if before:
            pauses.append(new_t - max(before))
        delays.append(new_t - moved)
    return {"max_pause_s": round(max(pauses, default=float("nan")), 4),
            "alias_to_serving_p50_s": round(float(np.percentile(delays, 50)), 4) if delays else float("nan"),
            "alias_to_serving_p99_s": round(float(np.percentile(delays, 99)), 4) if delays else float("nan")}


def run_serving(base: Settings, events: int = 100_000, rate: float = 5000.0, seconds: float = 20.0) -> dict:
    with broker(base) as bootstrap:
        s = isolated(base, bootstrap, "serving", serving_shadow=False)
        apply(s)
        models.promote(s, make_producer(s), register_good(s, seed=1), reason="bench")
        backlog = synthetic_events(events, users=5000, rate=rate, seed=3)
        publish(s, backlog)
        n_imps = sum(t == "events.impressions" for t, _ in backlog)
        with running(s, "streams"):  # online features for every user of the backlog
            _wait_group(s, "streams", ["events.impressions", "events.clicks"], 600)
        with running(s, "serving"):
            t0 = time.perf_counter()
            preds = read_all(s, "predictions", n_imps, 600)
            backlog_s = time.perf_counter() - t0
            throughput = len(preds) / backlog_s
            log.info("backlog: %d predictions in %.1fs", len(preds), backlog_s)
            live_from = now_us()
            live = produce(s, rate=rate, duration=seconds, seed=9, progress=False)
            recs = [orjson.loads(m.value()) for m in read_all(s, "predictions", n_imps + live.produced, 60)]
            lat = [p["latency_s"] for p in recs if p["ts"] >= live_from]
    result = {"predictions_per_s": round(throughput, 1), "backlog_predictions": len(preds),
              "rate": rate, "live_predictions": len(lat),
              "p50_latency_s": round(float(np.percentile(lat, 50)), 4) if lat else None,
              "p99_latency_s": round(float(np.percentile(lat, 99)), 4) if lat else None}
    report(result)
    return result


def _wait_group(s: Settings, group: str, topics: list[str], timeout: float) -> None:
    """Until ``group`` (prefixed) has committed all records of ``topics`` and stops moving."""
    c = Consumer(consumer_config(s, f"{s.topic_prefix}{group}"))
    tps = [TopicPartition(s.topic(t), p) for t in topics for p in range(s.partitions)]
    deadline, prev, still = time.monotonic() + timeout, None, 0
    try:
        while time.monotonic() < deadline and still < 3:
            time.sleep(1.0)
            got = [tp.offset for tp in c.committed(tps, timeout=10)]
            hi = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
            at_end = all(o >= h - 1 for o, h in zip(got, hi, strict=True))  # Tansu reports ends short
            still = still + 1 if at_end and got == prev else 0
            prev = got
    finally:
        c.close()


def run_swap(base: Settings, swaps: int = 10, rate: float = 2000.0, every_s: float = 2.0) -> dict:
    with broker(base) as bootstrap:
        s = isolated(base, bootstrap, "swap", serving_shadow=False)
        apply(s)
        producer = make_producer(s)
        models.promote(s, producer, register_good(s, seed=100), reason="bench")
        versions = [register_good(s, seed=101 + i, challenger=False) for i in range(swaps)]
        with running(s, "serving"):
            stop = threading.Event()
            gen_box: dict[str, Any] = {}
            t = threading.Thread(target=lambda: gen_box.update(g=produce(
                s, rate=rate, duration=every_s * (swaps + 2), seed=4, progress=False, should_stop=stop.is_set)))
            t.start()
            time.sleep(every_s)
            promotions = []
            for v in versions:
                ev = models.promote(s, producer, v, reason="bench")
                promotions.append((v, ev.timeline["promoted"] / 1e6))
                time.sleep(every_s)
            t.join()
            imps = source_offsets(s, gen_box["g"].produced)
            preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", len(imps), 60)]
    result = {"swaps": len(promotions), **audit(s, set(imps), preds), **swap_timings(preds, promotions)}
    result.pop("versions")
    report(result)
    return result
