"""``driftloop bench serving`` and ``driftloop bench swap``, and the prediction audit both share with
the tests. Both run the ads example (model ``ctr``, scored topic ``events.impressions``).

* serving: one serving process over a backlog of impressions whose users have online features
  (written to the online store first) → predictions/s including the feature lookup; then impressions
  at a fixed rate → p50/p99 event → prediction latency; its RSS. The same with the int8 copy of the
  model (``int8_tolerance``), side by side; the pipe rate over the same backlog (median of 3) and the pipe
  latency at the same rate (records stamped, produced and consumed with no work: the broker's floor); then the
  backlog with three models declared on the topic (``ctr`` and two copies) → predictions/s of all three.
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

from driftloop.app.producer import load_generator, produce, publish
from driftloop.bench.common import broker, isolated, report, rss_mb, running
from driftloop.bench.model_fixtures import register_good
from driftloop.bench.online import _fill
from driftloop.bench.pipe import pipe_latency, pipe_rates
from driftloop.core.contracts import now_us
from driftloop.core.declarations import Declarations
from driftloop.core.kafka import consumer_config, good_messages, make_producer
from driftloop.core.settings import Settings
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import open_store
from driftloop.registry.aliases import promote
from driftloop.registry.verify import load_scorer
from driftloop.serving.worker import scores_of

log = logging.getLogger(__name__)

MODEL = "ctr"


def copies_of_ctr(names: list[str]) -> str:
    """A repo file declaring more models like the ads example's ``ctr`` (same topic, label and features)."""
    decls = "\n".join(f"{n} = Model(name={n!r}, task='binary', metric='log_loss', source=impressions, "
                      f"features=ctr_v1, label=OutcomeLabel(source=clicks, join_on='impression_id'))" for n in names)
    return ("from ads import clicks, ctr_v1, impressions\n\n"
            f"from driftloop.core.declarations import Model, OutcomeLabel\n\n{decls}\n")


def read_all(settings: Settings, topic: str, until: int, timeout: float, idle_s: float = 5.0) -> list[Any]:
    """Records of a logical topic from the beginning: until ``until`` records were read, or, after
    ``timeout``, once the ends seen at the start are reached or nothing arrived for ``idle_s`` (the embedded
    broker reports an end up to one batch short: ``tests.helpers.read_all`` reads a quiet topic to its end)."""
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


def source_offsets(settings: Settings, topic: str, n: int, timeout: float = 60) -> dict[str, tuple[int, int]]:
    """event_id → (partition, offset) of the events on a logical topic."""
    out = {}
    for m in read_all(settings, topic, n, timeout):
        try:
            out[orjson.loads(m.value())["event_id"]] = (m.partition(), m.offset())
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def audit(settings: Settings, event_ids: set[str], preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Lost, duplicated and mis-versioned predictions of one model: each prediction is re-scored by the
    version it names, on the feature vector it carries (atol 1e-5)."""
    decls = Declarations.load(settings.declarations_file)
    per_event = Counter(p["event_id"] for p in preds)
    by_version: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        by_version[(p["model_name"], p["model_version"])].append(p)
    misversioned = 0
    for (name, version), ps in by_version.items():
        spec = decls.model(name)
        scorer = load_scorer(settings, name, version, spec.features, spec.task, spec.n_outputs,
                             verify_reference=False)
        x = np.array([[p["features"][c] for c in spec.features] for p in ps], np.float32)
        want, want_p = scores_of(spec.task, scorer.score(x))
        bad = ~np.isclose([p["score"] for p in ps], want, atol=1e-5, rtol=0)
        if want_p is not None:
            bad |= ~np.isclose([p["probabilities"] for p in ps], want_p, atol=1e-5, rtol=0).all(axis=1)
        misversioned += int(bad.sum())
    return {"predictions": len(preds), "lost": len(event_ids - set(per_event)),
            "duplicated": sum(n - 1 for n in per_event.values() if n > 1),
            "unexpected": len(set(per_event) - event_ids), "misversioned": misversioned,
            "versions": sorted({v for _, v in by_version}, key=int)}


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


def _backlog(base: Settings, bootstrap: str, models: list[str], events: int, rate: float,
             **overrides: Any) -> tuple[Settings, int]:
    """Isolated settings serving ``models`` (each with a champion), a backlog of impressions published and
    the online features of its users written; returns (settings, impressions)."""
    extra = {"more_models.py": copies_of_ctr([m for m in models if m != MODEL])} if models != [MODEL] else {}
    s = isolated(base, bootstrap, "serving", example="ads", repo_files=extra, serving_shadow=False, **overrides)
    producer = make_producer(s)
    for m in models:
        promote(s, producer, m, register_good(s, seed=1, model=m), reason="bench")
    users = 5000
    _fill(open_store(s), users, np.random.default_rng(2))  # every user of the backlog has online features
    # stamped in the past: a prediction's time is its event time + latency, and the latency of an event
    # stamped ahead of the scoring clock reads 0, which would put its prediction at its event time
    start_us = now_us() - int(events / rate * 1e6) - 1_000_000
    backlog = [(t, r) for t, r in synthetic_events(events, users=users, rate=rate, seed=3, start_us=start_us)
               if t == "events.impressions"]
    publish(s, backlog)
    return s, len(backlog)


def _scored_all(s: Settings, models: list[str], events: int, timeout: float = 600.0) -> None:
    """Until every model's serving group has committed all ``events`` of its scored topic (so their predictions
    are acknowledged); ``TimeoutError`` after ``timeout``."""
    topic = s.topic(Declarations.load(s.declarations_file).model(models[0]).topic)
    consumers = [Consumer(consumer_config(s, f"{s.topic_prefix}serving.{m}")) for m in models]
    tps = [TopicPartition(topic, p) for p in range(s.partitions)]
    deadline, done = time.monotonic() + timeout, [0] * len(models)
    try:
        while True:
            done = [sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10)) for c in consumers]
            if min(done) >= events:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"serving committed {dict(zip(models, done, strict=True))} of {events:,} "
                                   f"events in {timeout:.0f}s")
            time.sleep(0.2)
    finally:
        for c in consumers:
            c.close()


def _throughput(s: Settings, models: list[str], events: int) -> tuple[float, int, float]:
    """Predictions/s of a serving process over the backlog, timed as the pipe rate is: from its first batch
    scored to its last (the worker's own clock), so the consumer group's join is not counted; then the same
    from ready to the last commit (the figure before the pipe rate was measured), and the count. The predictions
    are read once all are acknowledged: a reader at the tail of a topic that several producers append to at
    once stopped short of its end on the embedded broker (897,546 of 900,000 records with three models)."""
    t0 = time.perf_counter()
    _scored_all(s, models, events)
    took = time.perf_counter() - t0
    preds = read_all(s, "predictions", events * len(models), 120)
    at = np.sort([scored_at(p) for p in map(orjson.loads, (m.value() for m in preds))])
    first = int(np.searchsorted(at, at[0], side="right")) if len(at) else 0  # the first batch: scored before t0
    steady = (len(at) - first) / (at[-1] - at[0]) if len(at) > first else float("nan")
    log.info("backlog: %d predictions in %.1fs since ready; %.0f/s from the first batch", len(preds), took, steady)
    return steady, len(preds), len(preds) / took


def _one_model(base: Settings, bootstrap: str, events: int, rate: float, seconds: float, label: str,
               **overrides: Any) -> dict[str, Any]:
    """Backlog throughput, then event → prediction latency at ``rate``, and the process's RSS, of one
    serving process scoring the example's model."""
    s, n_imps = _backlog(base, bootstrap, [MODEL], events, rate, **overrides)
    with running(s, "serving") as child:
        throughput, n_preds, from_ready = _throughput(s, [MODEL], n_imps)
        rss_backlog = rss_mb(child.proc.pid)[0]
        print(f"{label}: {throughput:,.0f} predictions/s over {n_preds:,} events ({from_ready:,.0f}/s since ready); "
              f"RSS {rss_backlog:,.0f} MiB",
              flush=True)
        live_from = now_us()
        live = produce(s, [load_generator(s, MODEL, seed=9)], rate=rate, duration=seconds, progress=False)
        _scored_all(s, [MODEL], n_imps + live, 120)
        recs = [orjson.loads(m.value()) for m in read_all(s, "predictions", n_imps + live, 60)]
        lat = [p["latency_s"] for p in recs if p["ts"] >= live_from]
        peak = rss_mb(child.proc.pid)[1]
    p50, p99 = (round(float(np.percentile(lat, q)), 4) if lat else None for q in (50, 99))
    print(f"{label}: latency at {rate:,.0f} events/s p50 {p50} s, p99 {p99} s; peak RSS {peak:,.0f} MiB", flush=True)
    return {"settings": s, "events": n_imps, "predictions_per_s": round(throughput, 1), "backlog_predictions": n_preds,
            "predictions_per_s_since_ready": round(from_ready, 1),
            "live_predictions": len(lat), "p50_latency_s": p50, "p99_latency_s": p99, "peak_rss_mib": round(peak),
            "rss_mib_after_backlog": round(rss_backlog)}


def run_serving(base: Settings, events: int = 100_000, rate: float = 10000.0, seconds: float = 20.0,
                int8_tolerance: float = 0.05) -> dict:
    with broker(base) as bootstrap:
        fp32 = _one_model(base, bootstrap, events, rate, seconds, "fp32")
        s = fp32.pop("settings")
        print("pipe: the same backlog consumed and produced back with no work", flush=True)
        pipes = pipe_rates(s, [Declarations.load(s.declarations_file).model(MODEL).topic], fp32["events"])
        pipe = pipes["median"]
        print(f"pipe latency: records stamped and produced at {rate:,.0f}/s, consumed with no work", flush=True)
        floor = pipe_latency(s, rate, seconds)
        over = {"model_overrides": {MODEL: {"int8_tolerance": int8_tolerance}}}
        int8 = _one_model(base, bootstrap, events, rate, seconds, "int8", **over)
        int8.pop("settings")
        models = [MODEL, f"{MODEL}_copy1", f"{MODEL}_copy2"]
        s3, n3 = _backlog(base, bootstrap, models, events, rate)
        with running(s3, "serving"):
            throughput3, n_preds3, _ = _throughput(s3, models, n3)
    print(f"fp32 {fp32['predictions_per_s']:,.0f}/s = {fp32['predictions_per_s'] / pipe:.0%} of the pipe rate "
          f"{pipe:,.0f}/s (median of 3, {pipes['min']:,.0f}-{pipes['max']:,.0f}); "
          f"int8 {int8['predictions_per_s']:,.0f}/s; 3 models {throughput3:,.0f}/s", flush=True)
    print(f"fp32 latency p99 {fp32['p99_latency_s']} s against the pipe's {floor['p99']} s at {rate:,.0f}/s "
          "(the broker and clients alone)", flush=True)
    result = {**{k: v for k, v in fp32.items() if k != "events"}, "rate": rate,
              "pipe_events_per_s": round(pipe), "pipe_events_per_s_min": round(pipes["min"]),
              "pipe_events_per_s_max": round(pipes["max"]), "pipe_share": round(fp32["predictions_per_s"] / pipe, 3),
              "pipe_p50_latency_s": floor["p50"], "pipe_p99_latency_s": floor["p99"],
              "int8": {k: v for k, v in int8.items() if k != "events"}, "int8_tolerance": int8_tolerance,
              "predictions_per_s_3_models": round(throughput3, 1), "backlog_predictions_3_models": n_preds3}
    report(result)
    return result


def run_swap(base: Settings, swaps: int = 10, rate: float = 2000.0, every_s: float = 2.0) -> dict:
    with broker(base) as bootstrap:
        s = isolated(base, bootstrap, "swap", example="ads", serving_shadow=False)
        producer = make_producer(s)
        promote(s, producer, MODEL, register_good(s, seed=100), reason="bench")
        versions = [register_good(s, seed=101 + i, challenger=False) for i in range(swaps)]
        topic = Declarations.load(s.declarations_file).model(MODEL).topic
        with running(s, "serving"):
            stop = threading.Event()
            box: dict[str, Any] = {}
            t = threading.Thread(target=lambda: box.update(n=produce(
                s, [load_generator(s, MODEL, seed=4)], rate=rate, duration=every_s * (swaps + 2), progress=False,
                should_stop=stop.is_set)))
            t.start()
            time.sleep(every_s)
            promotions = []
            for v in versions:
                ev = promote(s, producer, MODEL, v, reason="bench")
                promotions.append((v, ev.timeline["promoted"] / 1e6))
                time.sleep(every_s)
            t.join()
            imps = source_offsets(s, topic, box["n"])
            preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", len(imps), 60)]
    result = {"swaps": len(promotions), **audit(s, set(imps), preds), **swap_timings(preds, promotions)}
    result.pop("versions")
    report(result)
    return result
