"""Serving through the real broker and MLflow store, on the ads example (model ``ctr``): hot swaps under
load (audited), shadow scoring, rollback through the CLI, every kind of bad model refused while the
champion serves on, a SIGKILL mid-stream, and two declared models scoring every event of one topic
(with invalid events dead-lettered once per model)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import numpy as np
import orjson
import pandas as pd
from confluent_kafka import Consumer, TopicPartition

from driftloop.app.producer import load_generator, produce, publish
from driftloop.app.supervisor import Child, settings_env
from driftloop.bench.model_fixtures import BAD_KINDS, register_bad, register_good
from driftloop.bench.serving import audit, read_all, source_offsets
from driftloop.core.contracts import Prediction, now_us
from driftloop.core.declarations import LabelSpec, ModelSpec
from driftloop.core.kafka import consumer_config, make_producer
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.core.worker import RESTART_EXIT
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import apply, init_repo, open_store
from driftloop.registry.aliases import promote
from driftloop.registry.verify import Scorer
from driftloop.registry.versions import alias_version
from driftloop.serving.worker import prediction_records
from tests.helpers import wait_for, worker

MODEL = "ctr"
TOPIC = "events.impressions"


def _repo(settings: Settings, files: dict[str, str] | None = None) -> Settings:
    """The settings on a repo of their own (the ads example plus ``files``), applied, topics created."""
    repo = settings.root / "repo"
    init_repo(repo, "ads")
    for name, text in (files or {}).items():
        (repo / name).write_text(text)
    s = Settings(**{**settings.model_dump(), "repo": repo})
    decls = apply(s)[2]
    ensure_topics(s, sorted(decls.topics))
    return s


def _preds(s: Settings, topic: str = "predictions", n: int = 10**9, timeout: float = 0) -> list[dict]:
    """The records on a topic now (or, with ``timeout``, once ``n`` arrived or the topic went quiet)."""
    return [orjson.loads(m.value()) for m in read_all(s, topic, n, timeout, idle_s=0.5)]


def _champion(s: Settings, seed: int = 1, model: str = MODEL) -> str:
    return promote(s, make_producer(s), model, register_good(s, seed=seed, model=model), reason="test").version


def _traffic(s: Settings, seed: int, **kw) -> int:
    return produce(s, [load_generator(s, MODEL, seed=seed)], progress=False, **kw)


def test_swaps_under_load_shadow_and_rollback(settings: Settings):
    s = _repo(settings)
    v1 = _champion(s)
    producer = make_producer(s)
    with worker(s, "serving"):
        stop, box = threading.Event(), {}
        t = threading.Thread(target=lambda: box.update(n=_traffic(s, 3, rate=500, duration=600,
                                                                  should_stop=stop.is_set)))  # to the end
        t.start()
        try:
            v2 = register_good(s, seed=2)  # becomes the challenger: shadow-scored beside v1
            wait_for(lambda: any(p["model_version"] == v2 for p in _preds(s, "predictions.shadow")), 30)
            swaps = [v2] + [register_good(s, seed=10 + i, challenger=False) for i in range(3)]
            for v in swaps:
                promote(s, producer, MODEL, v, reason="test")
                wait_for(lambda v=v: any(p["model_version"] == v for p in _preds(s)), 15)
            r = subprocess.run([sys.executable, "-m", "driftloop.app.cli", "rollback", MODEL],
                               env=settings_env(s), capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr[-2000:]
            assert alias_version(s, MODEL) == swaps[-2]
            wait_for(lambda: _preds(s)[-1]["model_version"] == swaps[-2], 15)
        finally:
            stop.set()
            t.join()
        imps = source_offsets(s, TOPIC, box["n"])
        preds = _preds(s, n=len(imps), timeout=60)
    result = audit(s, set(imps), preds)
    assert (result["lost"], result["duplicated"], result["misversioned"], result["unexpected"]) == (0, 0, 0, 0), result
    assert result["versions"] == [v1, *swaps]
    assert all(Prediction.model_validate(p).key == p["key"] for p in preds[:50])
    shadow = _preds(s, "predictions.shadow")
    assert shadow and audit(s, {p["event_id"] for p in shadow}, shadow)["misversioned"] == 0


def test_bad_models_are_refused_while_the_champion_serves(settings: Settings):
    s = _repo(settings)
    v1 = _champion(s)
    producer = make_producer(s)
    with worker(s, "serving"):
        produced = 0
        for kind in BAD_KINDS:
            bad = register_bad(s, kind)
            promote(s, producer, MODEL, bad, reason="test")
            wait_for(lambda bad=bad: any(r["version"] == bad for r in _preds(s, "models.rejected")), 30)
            produced += _traffic(s, produced, rate=500, count=200)
            preds = wait_for(lambda n=produced: (p := _preds(s)) and len(p) >= n and p, 30)
            assert {p["model_version"] for p in preds} == {v1}, kind
    rejected = {r["version"]: r for r in _preds(s, "models.rejected")}
    assert {r["model_name"] for r in rejected.values()} == {MODEL}
    checks = [next(k for k in rejected[v]["checks"] if k.startswith("serving_verification."))
              for v in sorted(rejected, key=int)]
    assert checks == ["serving_verification.outputs", "serving_verification.signature",
                      "serving_verification.checksum", "serving_verification.signature"]


def test_sigkill_mid_stream_loses_nothing(settings: Settings):
    s = _repo(settings)
    _champion(s)
    backlog = [x for x in synthetic_events(120_000, users=2000, seed=5, start_us=now_us()) if x[0] == TOPIC]
    publish(s, backlog)  # a backlog serving needs a second or more for
    child = Child("serving", settings_env(s), s.root / "serving.log")
    # the kill waits on the predictions' end offsets as the broker reports them: a cheap count (reading every
    # prediction at each poll took longer than serving takes for the whole backlog)
    ends = Consumer(consumer_config(s, "test-ends"))
    parts = [TopicPartition(s.topic("predictions"), p) for p in range(s.partitions)]
    try:
        child.start()
        wait_for(lambda: sum(ends.get_watermark_offsets(tp, timeout=10)[1] for tp in parts) >= 3000, 120,
                 every=0.02)
        child.signal_group(signal.SIGKILL)
    finally:
        ends.close()
    child.proc.wait()
    group = Consumer(consumer_config(s, f"{s.topic_prefix}serving.{MODEL}"))
    committed = {tp.partition: tp.offset for tp in group.committed(
        [TopicPartition(s.topic(TOPIC), p) for p in range(s.partitions)], timeout=10)}
    group.close()
    before = len(_preds(s))
    assert before < len(backlog), "the kill came too late to test anything"
    (s.run_dir / "serving.ready").unlink(missing_ok=True)
    child.start()
    try:
        imps = source_offsets(s, TOPIC, len(backlog))
        wait_for(lambda: len({p["event_id"] for p in _preds(s)}) >= len(imps), 120, every=1.0)
    finally:
        child.stop()
    preds = _preds(s)
    result = audit(s, set(imps), preds)
    assert result["lost"] == 0 and result["misversioned"] == 0, result
    seen: dict[str, int] = {}
    for p in preds:
        seen[p["event_id"]] = seen.get(p["event_id"], 0) + 1
    dups = [imps[e] for e, n in seen.items() if n > 1]
    assert all(off >= committed[part] for part, off in dups), "a record before the last commit was scored twice"


LITE = '''
from feast import FeatureService

from ads import ad_request_features, clicks, impressions, user_impressions
from driftloop.core.declarations import Model, OutcomeLabel

ctr_lite_v1 = FeatureService(name="ctr_lite_v1", features=[ad_request_features[["ad_position", "ad_bid"]],
                                                           user_impressions[["impressions_1m"]]])
ctr_lite = Model(name="ctr_lite", task="binary", metric="log_loss", source=impressions, features=ctr_lite_v1,
                 label=OutcomeLabel(source=clicks, join_on="impression_id"))
'''


def test_two_models_score_every_event_with_their_own_versions(settings: Settings):
    s = _repo(settings, {"ctr_lite.py": LITE})
    _champion(s, seed=1)
    v_ctr = _champion(s, seed=2)  # ctr serves its second version, ctr_lite its first
    v_lite = _champion(s, seed=3, model="ctr_lite")
    assert (v_ctr, v_lite) == ("2", "1")
    users = [f"u{i}" for i in range(50)]
    now = pd.Timestamp.now(tz="UTC")
    counts = {u: i + 1 for i, u in enumerate(users)}
    open_store(s).write_to_online_store("user_impressions", pd.DataFrame({
        "user_id": users, "impressions_1m": [counts[u] for u in users], "mean_bid_1m": [0.5] * len(users),
        "event_timestamp": [now] * len(users), "created": [now] * len(users)}))
    events = [r for t, r in synthetic_events(300, users=60, seed=8, start_us=now_us()) if t == TOPIC]
    invalid = [(TOPIC, b"u1", b"{not json"), (TOPIC, b"u2", orjson.dumps({**events[0], "bid": "high"}))]
    with worker(s, "serving") as proc:
        publish(s, [(TOPIC, e) for e in events] + invalid)
        preds = wait_for(lambda: (p := _preds(s)) and len(p) >= 2 * len(events) and p, 60)
        dlq = wait_for(lambda: (d := read_all(s, "dlq", 4, 0, idle_s=0.5)) and len(d) >= 4 and d, 30)
        apply(s)  # new declarations: the worker finishes its batches and exits to be restarted on them
        wait_for(lambda: proc.poll() is not None, 30)
        assert proc.returncode == RESTART_EXIT
    by_model = {m: [p for p in preds if p["model_name"] == m] for m in ("ctr", "ctr_lite")}
    ids = {e["event_id"] for e in events}
    for m, version in (("ctr", v_ctr), ("ctr_lite", v_lite)):
        result = audit(s, ids, by_model[m])
        assert (result["lost"], result["duplicated"], result["unexpected"], result["misversioned"]) == (0, 0, 0, 0)
        assert result["versions"] == [version]
    # ctr_lite's vectors: its three features, from the event and the online store (0 for users without values)
    by_id = {e["event_id"]: e for e in events}
    got = np.array([[p["features"][f] for f in ("ad_position", "ad_bid", "impressions_1m")]
                    for p in by_model["ctr_lite"]])
    want = np.array([[by_id[p["event_id"]]["position"], by_id[p["event_id"]]["bid"], counts.get(p["key"], 0)]
                     for p in by_model["ctr_lite"]])
    assert all(len(p["features"]) == 3 for p in by_model["ctr_lite"]) and np.allclose(got, want, atol=1e-6)
    assert all(p["key"] == by_id[p["event_id"]]["user_id"] for p in preds)
    assert all(len(p["features"]) == 7 for p in by_model["ctr"])
    headers = sorted((dict((k, v.decode()) for k, v in m.headers())["consumer"],
                      dict((k, v.decode()) for k, v in m.headers())["reason"]) for m in dlq)
    assert headers == [("serving.ctr", "bad_json"), ("serving.ctr", "invalid"),
                       ("serving.ctr_lite", "bad_json"), ("serving.ctr_lite", "invalid")]
    assert all({"error", "source_topic", "partition", "offset"} <= {k for k, _ in m.headers()} for m in dlq)


def test_prediction_json_is_the_contracts_whatever_the_feature_names():
    """The records serving encodes (msgspec structs) are, byte for byte, orjson's encoding of ``Prediction``'s fields
    in the contract's order, for feature names that are not identifiers."""
    label = LabelSpec(kind="field", topic="labels.x", id_field="event_id", value_field="y")
    names = ["a b", "class", "ünï", "x.y"]
    spec = ModelSpec(name="m", task="binary", metric="log_loss", higher_is_better=False, topic="events.x", key="k",
                     key_type="string", feature_service="s", features=names, label=label)
    events = [{"event_id": f"e{i}", "ts": 1_000_000 + i, "k": f"u{i}"} for i in range(50)]
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    out = np.random.default_rng(1).random(50).astype(np.float32)
    recs = prediction_records(spec, Scorer("m", "4", "run", names, "onnx", lambda v: v, "binary"), events, x, out,
                              now_s=3.0)
    for ev, row, score, (key, value, lat) in zip(events, x.tolist(), out.tolist(), recs, strict=True):
        expected = {"schema_version": Prediction.SCHEMA_VERSION, "event_id": ev["event_id"], "ts": ev["ts"],
                    "key": ev["k"], "model_name": "m", "model_version": "4", "score": score, "probabilities": None,
                    "features": dict(zip(names, row, strict=True)), "latency_s": lat}
        assert list(expected) == list(Prediction.model_fields) and key == ev["k"].encode()
        assert value == orjson.dumps(expected)


def test_prediction_records_per_task():
    label = LabelSpec(kind="field", topic="labels.x", id_field="event_id", value_field="y")
    events = [{"event_id": "e1", "ts": 1_000_000, "k": 7}, {"event_id": "e2", "ts": 2_000_000, "k": 8}]
    x = np.array([[1.5, 0], [2.5, 1]], np.float32)
    cases = {"binary": (np.array([0.25, 1.0000001], np.float32), [0.25, 1.0], None),
             "regression": (np.array([-3.5, 12.0], np.float32), [-3.5, 12.0], None),
             "multiclass": (np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], np.float32), [1.0, 0.0],
                            [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])}
    for task, (out, scores, probs) in cases.items():
        spec = ModelSpec(name="m", task=task, metric="accuracy" if task == "multiclass" else "rmse",
                         higher_is_better=True, topic="events.x", key="k", key_type="int", feature_service="s",
                         features=["a", "b"], label=label, classes=["x", "y", "z"] if task == "multiclass" else [])
        scorer = Scorer("m", "4", "run", ["a", "b"], "onnx", lambda v: v, task)
        recs = prediction_records(spec, scorer, events, x, out, now_s=3.0)
        got = [Prediction.from_bytes(v) for _, v, _ in recs]
        assert [k for k, _, _ in recs] == [b"7", b"8"] and [p.key for p in got] == ["7", "8"]
        assert [p.latency_s for p in got] == [2.0, 1.0] and [p.event_id for p in got] == ["e1", "e2"]
        assert [p.features for p in got] == [{"a": 1.5, "b": 0.0}, {"a": 2.5, "b": 1.0}]
        assert np.allclose([p.score for p in got], scores) and {p.model_version for p in got} == {"4"}
        if probs is None:
            assert all(p.probabilities is None for p in got)
        else:
            assert np.allclose([p.probabilities for p in got], probs)
