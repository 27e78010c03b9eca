"""One integration test per part, through the real broker, Delta tables, Feast, MLflow and Ray.

The parts run in loop order on one shared data directory (module-scoped) with the ads example as the repo:
streams builds features and labels, retrain trains the first ``ctr`` champion on them, serving scores with
it, drift compares windows.
"""

from __future__ import annotations

import uuid

import numpy as np
import orjson
import pandas as pd
import pytest
import requests
from confluent_kafka import Producer

from driftloop.app.producer import load_generator, produce
from driftloop.core import delta
from driftloop.core.contracts import ModelPromoted, ModelRejected, Prediction, RetrainRequest
from driftloop.core.declarations import ModelSpec
from driftloop.core.settings import Settings
from driftloop.features.repo import declarations, open_store
from driftloop.features.training import training_set
from driftloop.registry.verify import load_scorer
from driftloop.registry.versions import alias_version, load_reference
from tests.helpers import alert_webhook, apply_repo, read_topic, wait_for, worker

N = 4000
RATE = 400
GARBAGE = [b"not json", b"[1,2]", b'{"schema_version": 1, "bid": "x"}', b'{"schema_version": 9, "event_id": "x"}',
           b"x" * 70000]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, bootstrap_servers) -> Settings:
    s = Settings(data_dir=tmp_path_factory.mktemp("pipe"), bootstrap_servers=bootstrap_servers,
                 topic_prefix=f"p{uuid.uuid4().hex[:8]}.", partitions=2,
                 model_overrides={"ctr": {"min_labels": 1500, "drift_window": 500}})
    apply_repo(s)
    return s


@pytest.fixture(scope="module")
def ctr(pipe: Settings) -> ModelSpec:
    return declarations(pipe).model("ctr")


@pytest.fixture(scope="module")
def streamed(pipe: Settings) -> None:
    """Run the streams worker over N generated impressions plus garbage, spread over 10 s of event time: an
    impression's label is final once the clicks' watermark is 5 s (the label window) past it."""
    with worker(pipe, "streams"):
        gen = load_generator(pipe, "ctr", seed=1)
        produce(pipe, [gen], rate=RATE, count=N // 2, progress=False)
        p = Producer({"bootstrap.servers": pipe.bootstrap_servers})
        for g in GARBAGE:
            p.produce(pipe.topic("events.impressions"), key=b"u1", value=g)
        p.flush(10)
        produce(pipe, [gen], rate=RATE, count=N - N // 2, progress=False)
        wait_for(lambda: len(delta.read(pipe.offline_dir / "bronze_impressions", ["event_id"])) >= N, 90)
        wait_for(lambda: len(delta.read(pipe.offline_dir / "labels", ["event_id"])) >= N // 2, 60)


def test_streams_features_labels_and_dlq(pipe: Settings, streamed: None):
    bronze = delta.read(pipe.offline_dir / "bronze_impressions")
    assert len(bronze) == N and bronze["event_id"].is_unique
    assert str(bronze["event_timestamp"].dtype) in ("datetime64[us, UTC]", "datetime64[ns, UTC]")
    feats = delta.read(pipe.offline_dir / "user_impressions")
    assert len(feats) == N
    # the per-user 1-minute count equals a recount from the raw events (everything is within a minute)
    for user, grp in bronze.sort_values("ts").groupby("user_id"):
        last = feats[feats.user_id == user].sort_values("event_timestamp").iloc[-1]
        assert last["impressions_1m"] == len(grp) or grp["ts"].max() - grp["ts"].min() > 55e6
    # online store holds the newest value per user
    store = open_store(pipe)
    top = bronze["user_id"].value_counts().index[0]
    online = store.get_online_features(features=["user_impressions:impressions_1m"],
                                       entity_rows=[{"user_id": top}]).to_dict()
    assert online["impressions_1m"][0] == feats[feats.user_id == top]["impressions_1m"].max()
    # labels: one per impression, of model ctr, clicks joined
    labels = delta.read(pipe.offline_dir / "labels").drop_duplicates("event_id")
    assert set(labels["model_name"]) == {"ctr"} and set(labels["event_id"]) <= set(bronze["event_id"])
    assert 0.05 < labels["label"].mean() < 0.6
    # every garbage record is in the dlq with its reason; the valid stream carried on
    dlq = read_topic(pipe, "dlq", len(GARBAGE))
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dlq)
    assert reasons == sorted(["bad_json", "bad_json", "invalid", "schema_version", "oversize"])
    assert all(dict(m.headers())["error"] for m in dlq)


def test_training_set_is_point_in_time(pipe: Settings, ctr: ModelSpec, streamed: None):
    df, versions = training_set(pipe, ctr)
    assert len(df) > 1000 and list(df.columns) == ["event_id", "user_id", "ts", "label", *ctr.features]
    assert {"labels", "bronze_impressions", "user_impressions"} <= set(versions)
    assert all(v is not None for v in versions.values())
    bronze = delta.read(pipe.offline_dir / "bronze_impressions").set_index("event_id")
    assert np.allclose(df["ad_bid"], bronze.loc[df["event_id"], "bid"])  # request features of the scored event
    feats = delta.read(pipe.offline_dir / "user_impressions")
    row = df.iloc[len(df) // 2]
    earlier = feats[(feats.user_id == row.user_id) &
                    (feats.event_timestamp < pd.Timestamp(int(row.ts), unit="us", tz="UTC"))]
    want = earlier.sort_values(["event_timestamp", "created"])["impressions_1m"].iloc[-1] if len(earlier) else np.nan
    assert (np.isnan(want) and np.isnan(row.impressions_1m)) or row.impressions_1m == want


@pytest.fixture(scope="module")
def champion(pipe: Settings, streamed: None) -> str:
    """The retrain controller (real Ray) trains, registers and promotes the first champion."""
    from driftloop.retrain.controller import Controller
    from driftloop.retrain.launcher import RayTrainLauncher

    ctl = Controller(pipe, RayTrainLauncher(pipe))
    try:
        req = ctl.bootstrap_request("ctr")
        assert req is not None and req.reason == "bootstrap"
        ev = ctl.handle(req)
        assert isinstance(ev, ModelPromoted), ev
        # a second, identical training must not beat the champion by the margin: rejected
        again = ctl.handle(RetrainRequest(model_name="ctr", reason="manual"))
        assert isinstance(again, ModelRejected) and "metric" in again.checks
    finally:
        ctl.launcher.close()
    return ev.version


def test_retrain_registers_and_promotes(pipe: Settings, ctr: ModelSpec, champion: str):
    assert alias_version(pipe, "ctr") == champion
    scorer = load_scorer(pipe, "ctr", champion, ctr.features)
    assert ctr.features[:2] == ["ad_position", "ad_bid"]
    x = np.array([[1, 1.5, 0, 0, 3, 1.2, 1], [5, 0.5, 1, 0, 0, 0, 0]], np.float32)
    s = scorer.score(x)
    assert s.shape == (2,) and np.all((s > 0) & (s < 1)) and s[0] > s[1]  # top slot, high bid clicks more
    promoted = [orjson.loads(m.value()) for m in read_topic(pipe, "models.promoted", 1)]
    assert promoted[0]["model_name"] == "ctr" and promoted[0]["version"] == champion
    assert promoted[0]["timeline"]["job_finished"] > 0 and "holdout_log_loss" in promoted[0]["metrics"]
    ref = load_reference(pipe, "ctr", champion)
    assert list(ref.columns) == [*ctr.features, "score", "label"] and len(ref) > 100


def test_serving_scores_with_champion(pipe: Settings, ctr: ModelSpec, champion: str):
    with worker(pipe, "serving"):
        produce(pipe, [load_generator(pipe, "ctr", seed=5)], rate=1000, count=300, progress=False)
        msgs = read_topic(pipe, "predictions", N + 300, timeout=60)
    preds = [Prediction.from_bytes(m.value()) for m in msgs]
    assert len(preds) >= 300
    assert {p.model_version for p in preds} == {champion} and {p.model_name for p in preds} == {"ctr"}
    assert len({p.event_id for p in preds}) == len(preds)
    assert all(list(p.features) == ctr.features and 0 <= p.score <= 1 for p in preds)


def test_drift_monitor_flags_drift_and_requests_retrain(pipe: Settings, ctr: ModelSpec, champion: str):
    from driftloop.drift.monitor import Monitor

    mon = Monitor(pipe)
    ref = load_reference(pipe, "ctr", champion)
    rng = np.random.default_rng(0)
    assert ctr.drift_window == 500  # the override

    def preds(shift: float) -> list[Prediction]:
        rows = ref.sample(ctr.drift_window, replace=True, random_state=int(shift * 10))
        out = []
        for r in rows.to_dict("records"):
            f = {c: float(r[c]) + shift * (1 + rng.random()) for c in ctr.features}
            out.append(Prediction(key="u", model_name="ctr", model_version=champion,
                                  score=float(np.clip(r["score"] + shift / 5, 0, 1)), features=f, latency_s=0))
        return out

    calm = [mon.add(p) for p in preds(0.0)][-1]
    assert calm is not None and not calm.drifted
    drifted = [mon.add(p) for p in preds(1.5)][-1]
    assert drifted is not None and drifted.drifted and drifted.drift_share >= ctr.drift_share_threshold
    assert not [m for m in read_topic(pipe, "retrain.requests", 3, timeout=3)
                if RetrainRequest.from_bytes(m.value()).reason == "drift"], "one drifted window must not retrain"
    again = [mon.add(p) for p in preds(1.5)][-1]
    assert again is not None and again.drifted  # drift_persist_windows (2) in a row: now a request
    reqs = [RetrainRequest.from_bytes(m.value()) for m in read_topic(pipe, "retrain.requests", 2)]
    drift_reqs = [r for r in reqs if r.reason == "drift"]
    assert len(drift_reqs) == 1 and drift_reqs[0].since_ts == drifted.window_start_ts
    assert drift_reqs[0].model_name == "ctr" and len(drift_reqs[0].evidence["windows"]) == 2
    reports = read_topic(pipe, "drift.reports", 3)
    assert len(reports) == 3


def test_webhook_alert_becomes_retrain_request(pipe: Settings, tmp_path):
    from driftloop.drift.monitor import Monitor

    # a monitor of its own state: the drift test's request for ctr is still in flight in pipe's
    mon = Monitor(Settings(**{**pipe.model_dump(), "data_dir": tmp_path}), declarations(pipe))
    with alert_webhook(mon) as (base, auth):
        url = f"{base}/alerts"  # the deprecated route, {"model_name": ...}
        ok = requests.post(url, json={"model_name": "ctr", "source": "grafana"}, headers=auth, timeout=5)
        assert ok.status_code == 202
        assert requests.post(url, data=b"nope", headers=auth, timeout=5).status_code == 400
        assert requests.post(url, json={"source": "grafana"}, headers=auth, timeout=5).status_code == 422
        other = requests.post(url, json={"model_name": "other"}, headers=auth, timeout=5)
        assert other.status_code == 404 and other.json()["models"] == ["ctr"]
    reqs = [RetrainRequest.from_bytes(m.value()) for m in read_topic(pipe, "retrain.requests", 10, timeout=5)]
    hooks = [r for r in reqs if r.reason == "webhook"]
    assert [r.request_id for r in hooks] == [ok.json()["request_id"]]
    assert hooks[0].model_name == "ctr" and hooks[0].evidence["alert"]["source"] == "grafana"
