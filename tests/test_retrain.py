"""Retraining per declared model: metrics, built-in and declared trainers, training sets, the gate, drift routing.

A small feature repo in a temporary folder declares four models over one scored topic (binary, regression,
multiclass, and a binary one with its own trainer); its Delta tables (bronze events, a stream view, labels)
are written here directly, so no streams worker is needed. Expected values come from sklearn and pandas.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
import sklearn.metrics as skm

from driftloop.core import delta
from driftloop.core import model_metrics as metrics
from driftloop.core.contracts import ModelPromoted, ModelRejected, Prediction, RetrainRequest, RetrainStatus
from driftloop.core.declarations import ModelSpec
from driftloop.core.frames import to_matrix
from driftloop.core.kafka import make_producer
from driftloop.core.requests import RequestStore
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.features.repo import apply, declarations
from driftloop.features.training import count_labels, training_set
from driftloop.registry.aliases import promote
from driftloop.registry.versions import alias_version, client, load_reference, register_version
from driftloop.retrain.controller import Controller
from driftloop.retrain.launcher import LocalLauncher, RayTrainLauncher, TrainJob
from driftloop.retrain.trainers import checked_onnx, fit, onnx_outputs, outputs, to_onnx
from tests.helpers import alert_webhook, read_all, read_topic, wait_for, worker

REPO = '''
from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, Field, RequestSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, String

from driftloop.core.declarations import Model, OutcomeLabel, RetrainPolicy, Gate, event_source

SCORED = "item_id string, x1 double, x2 double"
items = event_source("events.items", SCORED)
outcomes = event_source("events.outcomes", "item_id string, scored_id string, value double")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

item_stats = StreamFeatureView(
    name="item_stats", entities=[item], ttl=timedelta(hours=1),
    source=event_source("events.items", SCORED, "item_stats"), timestamp_field="event_timestamp",
    aggregations=[Aggregation(column="x1", function="mean", time_window=timedelta(minutes=1),
                              name="x1_mean_1m")],
    schema=[Field(name="item_id", dtype=String), Field(name="x1_mean_1m", dtype=Float64)], online=True)

item_request = RequestSource(name="item_request", schema=[Field(name="x1", dtype=Float64),
                                                          Field(name="x2", dtype=Float64)])


@on_demand_feature_view(sources=[item_request], mode="pandas",
                        schema=[Field(name="f1", dtype=Float64), Field(name="f2", dtype=Float64)])
def item_request_features(inputs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"f1": inputs["x1"].astype("float64"), "f2": inputs["x2"].astype("float64")},
                        index=inputs.index)


items_v1 = FeatureService(name="items_v1", features=[item_request_features, item_stats])
KNOBS = dict(source=items, features=items_v1, gate=Gate(margin=0.001),
             retrain=RetrainPolicy(min_labels=1000, epochs=30))
m_bin = Model(name="m_bin", task="binary", metric="log_loss",
              label=OutcomeLabel(source=outcomes, join_on="scored_id"), **KNOBS)
m_reg = Model(name="m_reg", task="regression", metric="rmse",
              label=OutcomeLabel(source=outcomes, join_on="scored_id", value_field="value"), **KNOBS)
m_mc = Model(name="m_mc", task="multiclass", metric="accuracy", classes=["a", "b", "c"],
             label=OutcomeLabel(source=outcomes, join_on="scored_id", value_field="value"), **KNOBS)
m_custom = Model(name="m_custom", task="binary", metric="auc", trainer="my_trainer:train",
                 label=OutcomeLabel(source=outcomes, join_on="scored_id"), **KNOBS)
m_flaky = Model(name="m_flaky", task="binary", metric="auc", trainer="my_trainer:flaky",
                label=OutcomeLabel(source=outcomes, join_on="scored_id"), **KNOBS)
'''

TRAINER = '''
import numpy as np
import torch
from torch import nn

CALLS = []


class Logistic(nn.Module):
    """A logistic regression returning (n, 1) probabilities."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, 1)

    def forward(self, x):
        return torch.sigmoid(self.lin(x))


class Fixed(nn.Module):
    """Regression champions of the gate tests: w·x + b."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(float(b)))

    def forward(self, x):
        return x @ self.w + self.b


def train(train_df, valid_df, *, features, task, seed, device, classes):
    CALLS.append(dict(rows=len(train_df), valid=len(valid_df), features=features, task=task, seed=seed,
                      device=device, classes=classes))
    torch.manual_seed(seed)
    x = torch.from_numpy(train_df[features].fillna(0).to_numpy(np.float32))
    y = torch.from_numpy(train_df["label"].to_numpy(np.float32))
    model = Logistic(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.binary_cross_entropy(model(x).squeeze(1), y).backward()
        opt.step()
    return model


def flaky(train_df, valid_df, **kw):
    """``train``, after failing as many times as $FLAKY_FAILURES says (calls counted in $FLAKY_COUNTER)."""
    import os
    import pathlib

    counter = pathlib.Path(os.environ["FLAKY_COUNTER"])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n < int(os.environ["FLAKY_FAILURES"]):
        raise RuntimeError(f"flaky trainer: failure {n + 1}")
    return train(train_df, valid_df, **kw)
'''

N = 2500
FEATURES = ["f1", "f2", "x1_mean_1m"]
T0 = 1_800_000_000_000_000


def _bronze(rng: np.random.Generator) -> pd.DataFrame:
    ts = T0 + np.arange(N, dtype=np.int64) * 10_000 + rng.integers(0, 5_000, N)
    return pd.DataFrame({"event_id": [f"e{i}" for i in range(N)], "ts": ts, "schema_version": 1,
                         "item_id": [f"i{k}" for k in rng.integers(0, 50, N)],
                         "x1": rng.normal(size=N), "x2": rng.normal(size=N)})


def _labels(ev: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    x1, x2 = ev["x1"].to_numpy(), ev["x2"].to_numpy()
    binary = (x1 + 0.5 * x2 + rng.normal(0, 0.5, N) > 0).astype(float)
    value = 3 * x1 - 2 * x2 + 10 + rng.normal(0, 0.3, N)
    cls = np.argmax(np.column_stack([x1, x2, -x1 - x2]) + rng.normal(0, 0.3, (N, 3)), axis=1).astype(float)
    frames = [ev.assign(model_name=name, label=y) for name, y in
              (("m_bin", binary), ("m_reg", value), ("m_mc", cls), ("m_custom", binary), ("m_flaky", binary))]
    lab = pd.concat(frames, ignore_index=True)
    dup = lab[lab.model_name == "m_bin"].head(50).assign(label=lambda d: 1 - d["label"])  # an earlier label,
    lab = pd.concat([dup, lab], ignore_index=True)  # corrected later (the newest row of an event wins)
    return pd.DataFrame({"model_name": lab.model_name, "event_id": lab.event_id, "key": lab.item_id,
                         "label": lab.label, "ts": lab.ts})


def _stamp(df: pd.DataFrame, topic: str) -> pa.Table:
    t = pd.to_datetime(df["ts"], unit="us", utc=True)
    out = df.assign(event_timestamp=t, created=t, _topic=topic, _partition=0, _offset=np.arange(len(df)))
    return pa.Table.from_pandas(out, preserve_index=False).cast(pa.schema(
        [pa.field(f.name, delta.TS if f.name in ("event_timestamp", "created") else f.type)
         for f in pa.Schema.from_pandas(out, preserve_index=False)]))


def items_repo(root: Path) -> Path:
    """The four-model repo of these tests (and its trainer) under ``root/repo``."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "items.py").write_text(textwrap.dedent(REPO))
    (repo / "my_trainer.py").write_text(textwrap.dedent(TRAINER))
    return repo


def items_settings(root: Path, bootstrap_servers: str, **overrides: object) -> Settings:
    """Settings over the items repo under ``root``, with its Delta tables written and the repo applied."""
    s = Settings(data_dir=root / "data", repo=items_repo(root), bootstrap_servers=bootstrap_servers,
                 topic_prefix=f"r{uuid.uuid4().hex[:8]}.", partitions=1, retrain_wait_s=1, **overrides)
    apply(s)
    ensure_topics(s)
    rng = np.random.default_rng(0)
    ev = _bronze(rng)
    delta.append(s.offline_dir / "bronze_items", _stamp(ev, "events.items"))
    stats = ev.sort_values("ts").assign(x1_mean_1m=lambda d: d.groupby("item_id")["x1"].transform(
        lambda v: v.expanding().mean()))[["item_id", "x1_mean_1m", "ts"]]
    delta.append(s.offline_dir / "item_stats", _stamp(stats, "events.items"))
    delta.append(s.offline_dir / "labels", _stamp(_labels(ev, rng), "labels"))
    return s


@pytest.fixture(scope="module")
def rs(tmp_path_factory, bootstrap_servers) -> Settings:
    """Settings over the temporary repo, with its tables written and the repo applied."""
    return items_settings(tmp_path_factory.mktemp("retrain"), bootstrap_servers)


def decl(s: Settings, name: str) -> ModelSpec:
    return declarations(s).model(name)


# --- metrics ----------------------------------------------------------------------------------------

def test_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500).astype(float)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0.01, 0.99)
    p[:20] = 0.5  # ties
    assert metrics.log_loss(y, p) == pytest.approx(skm.log_loss(y, p))
    assert metrics.auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
    assert metrics.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p >= 0.5))
    assert metrics.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p))
    k = rng.integers(0, 3, 500)
    probs = rng.dirichlet(np.ones(3), 500)
    assert metrics.log_loss(k, probs) == pytest.approx(skm.log_loss(k, probs, labels=[0, 1, 2]))
    assert metrics.accuracy(k, probs) == pytest.approx(skm.accuracy_score(k, probs.argmax(1)))
    v, w = rng.normal(size=500), rng.normal(size=500)
    assert metrics.rmse(v, w) == pytest.approx(np.sqrt(skm.mean_squared_error(v, w)))
    assert metrics.mae(v, w) == pytest.approx(skm.mean_absolute_error(v, w))
    assert metrics.r2(v, w) == pytest.approx(skm.r2_score(v, w))
    assert np.isnan(metrics.auc(np.ones(5), np.linspace(0, 1, 5)))
    assert metrics.better(0.30, 0.32, higher_is_better=False, margin=0.01)
    assert not metrics.better(0.315, 0.32, higher_is_better=False, margin=0.01)
    assert metrics.better(0.9, 0.8, higher_is_better=True, margin=0.01) and not metrics.better(np.nan, 1, True, 0)


# --- built-in trainers ------------------------------------------------------------------------------

def _synthetic(task: str, n: int = 2000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(5, 3, n), "c": rng.integers(0, 4, n).astype(float)})
    df.loc[rng.random(n) < 0.05, "c"] = np.nan  # missing values are inputs of 0
    z = df["a"] + (df["b"] - 5) / 3 - 0.5 * df["c"].fillna(0)
    if task == "binary":
        df["label"] = (z + rng.normal(0, 0.5, n) > -0.7).astype(float)
    elif task == "regression":
        df["label"] = 100 + 20 * z + rng.normal(0, 2, n)  # far from 0/1: needs the target scaling
    else:
        df["label"] = np.digitize(z + rng.normal(0, 0.3, n), [-1.5, 0.0]).astype(float)
    return df


@pytest.mark.parametrize("task", ["binary", "regression", "multiclass"])
def test_builtin_trainer_learns_and_exports_onnx(task: str):
    df = _synthetic(task)
    train, valid, hold = df.iloc[:1400], df.iloc[1400:1600], df.iloc[1600:]
    classes = ["lo", "mid", "hi"] if task == "multiclass" else []
    model, history = fit(train, valid, features=["a", "b", "c"], task=task, classes=classes, epochs=25)
    assert len(history) == 25 and history[-1] < history[0]
    k = len(classes) or 1
    x, y = to_matrix(hold, ["a", "b", "c"]), hold["label"].to_numpy()
    out = outputs(model, x, k)
    if task == "binary":
        assert out.shape == (400,) and skm.log_loss(y, out) < skm.log_loss(y, np.full(400, train.label.mean()))
    elif task == "regression":
        const = np.full(400, train.label.mean())
        assert out.shape == (400,) and skm.mean_squared_error(y, out) < 0.2 * skm.mean_squared_error(y, const)
    else:
        freq = np.tile(train.label.value_counts(normalize=True).sort_index().to_numpy(), (400, 1))
        assert out.shape == (400, 3) and np.allclose(out.sum(1), 1, atol=1e-5)
        norm = out / out.sum(1, keepdims=True)
        assert skm.log_loss(y, norm, labels=[0, 1, 2]) < skm.log_loss(y, freq, labels=[0, 1, 2])
    blob, note = checked_onnx(model, x, k)
    assert note == "ok" and blob is not None
    np.testing.assert_allclose(onnx_outputs(blob, x, k), out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_outputs(blob, x[:1], k), out[:1], rtol=1e-4, atol=1e-4)  # dynamic batch


# --- training sets ------------------------------------------------------------------------------------

def test_training_set_is_the_models_labels_joined_point_in_time(rs: Settings):
    spec = decl(rs, "m_bin")
    assert count_labels(rs.offline_dir, "m_bin") == N and count_labels(rs.offline_dir, "nope") == 0
    assert count_labels(rs.offline_dir, "m_reg", since_ts=T0 + 10_000 * 2000) == 500
    df, versions = training_set(rs, spec)
    assert list(df.columns) == ["event_id", "item_id", "ts", "label", *FEATURES] and len(df) == N
    assert df["ts"].is_monotonic_increasing and set(versions) >= {"labels", "bronze_items", "item_stats"}
    ev = delta.read(rs.offline_dir / "bronze_items").set_index("event_id")
    lab = delta.read(rs.offline_dir / "labels")
    lab = lab[lab.model_name == "m_bin"].drop_duplicates("event_id", keep="last").set_index("event_id")
    got = df.set_index("event_id")
    assert (got["label"] == lab.loc[got.index, "label"]).all()  # the corrected (newest) label
    assert np.allclose(got["f1"], ev.loc[got.index, "x1"]) and np.allclose(got["f2"], ev.loc[got.index, "x2"])
    # the view's value is the newest row strictly before the event (pandas as-of join)
    stats = delta.read(rs.offline_dir / "item_stats").sort_values("ts")
    want = pd.merge_asof(df[["event_id", "item_id", "ts"]], stats[["item_id", "ts", "x1_mean_1m"]], on="ts",
                         by="item_id", allow_exact_matches=False).set_index("event_id")
    np.testing.assert_allclose(got["x1_mean_1m"], want.loc[got.index, "x1_mean_1m"], equal_nan=True)
    assert got["x1_mean_1m"].isna().sum() == 50  # each item's first event has no history: NaN, not 0
    tail, _ = training_set(rs, spec, since_ts=T0 + 10_000 * 2000, max_rows=300)
    assert list(tail["event_id"]) == list(df["event_id"].iloc[-300:])


# --- the controller and its gate --------------------------------------------------------------------

def _registered_task(s: Settings, name: str, version: str) -> str:
    return client(s).get_model_version(name, version).tags["task"]


def test_bootstrap_promotes_then_identical_retrain_fails_the_gate(rs: Settings):
    ctl = Controller(rs, LocalLauncher())
    reqs = ctl.bootstrap_requests()
    assert sorted(r.model_name for r in reqs) == ["m_bin", "m_custom", "m_flaky", "m_mc", "m_reg"]
    assert ctl.bootstrap_requests() == []  # once, until handled
    first = ctl.handle(next(r for r in reqs if r.model_name == "m_bin"))
    assert isinstance(first, ModelPromoted) and alias_version(rs, "m_bin") == first.version
    assert first.metrics["holdout_log_loss"] < 0.5 and "holdout_auc" in first.metrics
    ref = load_reference(rs, "m_bin", first.version)
    assert list(ref.columns) == [*FEATURES, "score", "label"] and len(ref) == N // 5
    assert set(ref["label"]) == {0.0, 1.0}  # the holdout's labels: the drift monitor calibrates on them
    again = ctl.handle(RetrainRequest(model_name="m_bin", reason="manual"))
    assert isinstance(again, ModelRejected) and "log_loss" in again.checks["metric"], again
    # reproducible: the same data and seed train to the same metrics, so it cannot beat itself
    assert client(rs).get_run(again.run_id).data.metrics["holdout_log_loss"] == first.metrics["holdout_log_loss"]
    assert alias_version(rs, "m_bin") == first.version and alias_version(rs, "m_bin", "challenger") == again.version
    rejected = [ModelRejected.from_bytes(m.value()) for m in read_topic(rs, "models.rejected", 1)]
    assert rejected[0].version == again.version and rejected[0].model_name == "m_bin"


def test_multiclass_model_is_trained_with_class_probabilities(rs: Settings):
    ev = Controller(rs, LocalLauncher()).handle(RetrainRequest(model_name="m_mc", reason="bootstrap"))
    assert isinstance(ev, ModelPromoted), ev
    assert ev.metrics["holdout_accuracy"] > 0.6  # three classes: chance is about 1/3
    assert _registered_task(rs, "m_mc", ev.version) == "multiclass"
    ref = load_reference(rs, "m_mc", ev.version)
    assert list(ref.columns) == [*FEATURES, "p0", "p1", "p2", "score", "label"]
    probs = ref[["p0", "p1", "p2"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and (ref["score"] == probs.argmax(1)).all()


def _champion(s: Settings, name: str, model, features: list[str]) -> str:
    """Register ``model`` and make it the champion of ``name``."""
    x = np.random.default_rng(0).normal(size=(50, len(features))).astype(np.float32)
    ref = pd.DataFrame(x, columns=features).assign(score=outputs(model, x, 1))
    version, _ = register_version(s, name, model, features, ref, onnx_bytes=to_onnx(model, len(features)),
                                  task="regression")
    promote(s, make_producer(s), name, version, reason="test")
    return version


def test_gate_promotes_a_better_and_rejects_a_worse_challenger(rs: Settings):
    from my_trainer import Fixed  # the repo module (on the path since apply)

    ctl = Controller(rs, LocalLauncher())
    weak = _champion(rs, "m_reg", Fixed([1.0, 0.0, 0.0], 10.0), FEATURES)
    better = ctl.handle(RetrainRequest(model_name="m_reg", reason="manual"))
    assert isinstance(better, ModelPromoted) and better.previous_version == weak
    assert better.metrics["holdout_rmse"] < better.metrics["champion_holdout_rmse"] - 0.001
    hold = training_set(rs, decl(rs, "m_reg"))[0].iloc[-N // 5:]
    assert better.metrics["holdout_rmse"] < 0.2 * hold["label"].std()  # in label units: target scaling works
    oracle = _champion(rs, "m_reg", Fixed([3.0, -2.0, 0.0], 10.0), FEATURES)  # the true function
    worse = ctl.handle(RetrainRequest(model_name="m_reg", reason="manual"))
    assert isinstance(worse, ModelRejected) and "rmse" in worse.checks["metric"], worse
    assert alias_version(rs, "m_reg") == oracle


def test_declared_trainer_is_used(rs: Settings):
    import my_trainer

    ev = Controller(rs, LocalLauncher()).handle(RetrainRequest(model_name="m_custom", reason="bootstrap"))
    assert isinstance(ev, ModelPromoted), ev
    call = my_trainer.CALLS[-1]
    assert call["features"] == FEATURES and call["task"] == "binary" and call["classes"] == [] and call["seed"] == 0
    assert call["rows"] + call["valid"] == N - N // 5 and call["valid"] == (N - N // 5) // 10
    run = client(rs).get_run(ev.run_id)
    assert run.data.params["trainer"] == "my_trainer:train" and run.data.params["onnx"] == "ok"
    assert ev.metrics["holdout_auc"] > 0.8


def test_unknown_model_and_too_few_labels_are_rejected(rs: Settings):
    ctl = Controller(rs, LocalLauncher())
    unknown = ctl.handle(RetrainRequest(model_name="nope", reason="manual"))
    assert isinstance(unknown, ModelRejected) and "m_bin" in unknown.checks["model"]
    few = ctl.handle(RetrainRequest(model_name="m_bin", reason="drift", since_ts=T0 + 10_000 * 2400))
    assert isinstance(few, ModelRejected) and few.checks["labels"].startswith("100 labelled events")


def _versions(s: Settings, name: str) -> list[str]:
    return sorted(str(v.version) for v in client(s).search_model_versions(f"name = '{name}'"))


def test_failing_trainer_is_retried_then_ends_failed_with_no_version(rs: Settings, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    s = rs.model_copy(update={"retrain_backoff_s": 0.0, "retrain_max_attempts": 3})
    monkeypatch.setenv("FLAKY_COUNTER", str(tmp_path / "calls"))
    monkeypatch.setenv("FLAKY_FAILURES", "99")
    ctl = Controller(s, LocalLauncher())
    hopeless = ctl.handle(RetrainRequest(model_name="m_flaky", reason="manual"))
    assert isinstance(hopeless, ModelRejected) and hopeless.outcome == "failed", hopeless
    assert "flaky trainer: failure 3" in hopeless.checks["error"]
    assert (tmp_path / "calls").read_text() == "3" and _versions(s, "m_flaky") == []  # nothing registered
    row = ctl.store.get(hopeless.request_id)
    assert row.state == "failed" and row.attempt == 3
    assert [h["state"] for h in row.history] == ["requested", "data", "training", "requested", "training",
                                                 "requested", "training", "failed"]
    assert ctl.handle(RetrainRequest.model_validate(row.request)) is None  # delivered again: already handled

    (tmp_path / "calls").unlink()
    monkeypatch.setenv("FLAKY_FAILURES", "2")
    ev = ctl.handle(RetrainRequest(model_name="m_flaky", reason="manual"))
    assert isinstance(ev, ModelPromoted), ev
    assert (tmp_path / "calls").read_text() == "3" and _versions(s, "m_flaky") == [ev.version]
    states = [h["state"] for h in ctl.store.get(ev.request_id).history]
    assert states == ["requested", "data", "training", "requested", "training", "requested", "training",
                      "evaluating", "evaluating", "promoted"]
    promoted = [ModelPromoted.from_bytes(m.value()) for m in read_all(s, "models.promoted")]
    assert [p.version for p in promoted if p.request_id == ev.request_id] == [ev.version]  # promoted once
    status = [RetrainStatus.from_bytes(m.value()) for m in read_all(s, "retrain.status")]
    assert [x.state for x in status if x.request_id == ev.request_id] == states[1:]


def test_history_shows_the_chain_and_manual_moves_pass_the_checks(rs: Settings, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch):
    from my_trainer import Fixed

    from tests.test_cli import cli as run_cli

    for k, v in {"DATA_DIR": rs.data_dir, "REPO": rs.repo, "BOOTSTRAP_SERVERS": rs.bootstrap_servers,
                 "TOPIC_PREFIX": rs.topic_prefix}.items():
        monkeypatch.setenv(f"DRIFTLOOP_{k}", str(v))
    ctl = Controller(rs, LocalLauncher())
    weak = _champion(rs, "m_reg", Fixed([0.5, 0.0, 0.0], 10.0), FEATURES)
    ev = ctl.handle(RetrainRequest(model_name="m_reg", reason="webhook", evidence={"alert": "perf-drop"}))
    assert isinstance(ev, ModelPromoted) and ev.previous_version == weak

    def cli(*argv: str) -> tuple[int, str, str]:
        return run_cli(capsys, *argv)

    rc, _, err = cli("promote", "m_reg", weak, "--reason", "try the old one")  # worse than the champion
    assert rc == 1 and "refused by the gate" in err and "\ndriftloop promote: metric: " in err
    assert alias_version(rs, "m_reg") == ev.version
    rc, out, _ = cli("rollback", "m_reg", "--reason", "bad deploy")  # skips the metric gate
    assert rc == 0 and f"champion v{ev.version} → v{weak}" in out and alias_version(rs, "m_reg") == weak
    rc, out, _ = cli("promote", "m_reg", ev.version, "--reason", "it was fine")  # better: passes
    assert rc == 0 and alias_version(rs, "m_reg") == ev.version

    rc, out, _ = cli("history", "m_reg")
    assert rc == 0
    block = out[out.index(f"request {ev.request_id}"):]
    for line in ("trigger   webhook; evidence: alert perf-drop", "data      train ", "feature service items_v1",
                 f"run       v{ev.version} (run {ev.run_id})", "trainer builtin:regression", "holdout_rmse",
                 "decision  promoted (gate passed)",
                 f"alias     champion v{weak} → v{ev.version}", "by retrain-controller"):
        assert line in block, (line, out)
    manual = out[out.index("alias moves not made by a retrain request:"):]
    assert f"champion v{ev.version} → v{weak}" in manual and "rollback: bad deploy" in manual
    assert f"champion v{weak} → v{ev.version}" in manual and "manual: it was fine" in manual and "by cli:" in manual
    data = json.loads(cli("history", "m_reg", "--json")[1])
    req = next(r for r in data["requests"] if r["request_id"] == ev.request_id)
    lineage = req["lineage"]
    assert lineage["trigger"] == {"reason": "webhook", "evidence": {"alert": "perf-drop"}}
    assert lineage["code"]["trainer_sha256"] and lineage["code"]["driftloop"]
    assert set(lineage["data"]["delta_versions"]) >= {"labels", "bronze_items", "item_stats"}
    assert lineage["gate"]["passed"] and lineage["params"]["seed"] == 0


def test_alias_ledger_is_append_only(rs: Settings):
    from sqlalchemy.exc import IntegrityError

    from driftloop.core.database import alias_moves, engine

    with pytest.raises(IntegrityError, match="append-only"), engine(rs).begin() as c:
        c.execute(alias_moves.delete())


def _latest_epoch(run_dir: Path) -> int:
    """The newest epoch checkpointed under a Ray Train run folder (the launcher's meta.json)."""
    epochs = []
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        with contextlib.suppress(OSError, ValueError):
            epochs.append(json.loads(meta.read_text()).get("epoch", 0))
    return max(epochs, default=0)


@pytest.mark.slow
def test_controller_killed_during_training_resumes_the_same_run(tmp_path: Path, bootstrap_servers: str):
    """The retrain worker SIGKILLed mid-training; started again, it resumes the request from its stored state
    and the Ray Train run from its last checkpoint: one request, one run, one version, one promotion."""
    quiet = {n: {"min_labels": 10**9} for n in ("m_reg", "m_mc", "m_custom", "m_flaky")}  # only m_bin trains
    s = items_settings(tmp_path, bootstrap_servers, model_overrides={"m_bin": {"epochs": 150}, **quiet})
    store = RequestStore(s)
    with worker(s, "retrain") as proc:  # bootstraps m_bin by itself
        row = wait_for(lambda: next((r for r in store.of_model("m_bin") if r.state == "training"), None), 120)
        run_dir = Path(s.train_storage_path) / f"m_bin-{row.request_id}"
        wait_for(lambda: _latest_epoch(run_dir) >= 3, 180, every=0.1)
        proc.kill()
        proc.wait()
    killed_at = _latest_epoch(run_dir)
    assert store.get(row.request_id).state == "training" and killed_at < 150
    with worker(s, "retrain", log_name="retrain-2"):
        wait_for(lambda: store.get(row.request_id).done, 300)
    final = store.get(row.request_id)
    assert final.state == "promoted", final
    resumed = [h["detail"]["resumed_from_epoch"] for h in final.history if "resumed_from_epoch" in h["detail"]]
    assert resumed and resumed[0] >= killed_at - 1, (resumed, killed_at)  # not from epoch 0
    assert [r.request_id for r in store.of_model("m_bin")] == [row.request_id]  # no second request
    assert _versions(s, "m_bin") == [final.version]
    runs = sorted(p.name for p in Path(s.train_storage_path).iterdir() if p.name.startswith("m_bin-"))
    assert runs == [f"m_bin-{row.request_id}"]  # the same run, not a second one
    promoted = [ModelPromoted.from_bytes(m.value()) for m in read_all(s, "models.promoted")]
    assert [p.version for p in promoted] == [final.version]


def test_ray_job_imports_the_declared_trainer_from_the_repo(rs: Settings):
    df = training_set(rs, decl(rs, "m_custom"))[0]
    launcher = RayTrainLauncher(rs)
    try:
        res = launcher.run(df.iloc[:1500], df.iloc[1500:1700],
                           TrainJob(model="m_custom", features=FEATURES, task="binary", trainer="my_trainer:train",
                                    repo=str(rs.feature_repo_dir)))
    finally:
        launcher.close()
    assert type(res.model).__module__ == "my_trainer" and res.device in ("cpu", "cuda")
    out = outputs(res.model, to_matrix(df.iloc[2000:], FEATURES), 1)
    assert skm.roc_auc_score(df.iloc[2000:]["label"], out) > 0.8


# --- drift: one state per model -----------------------------------------------------------------------

def test_drift_of_one_model_requests_a_retrain_of_that_model_only(rs: Settings):
    from my_trainer import Logistic

    from driftloop.drift.monitor import Monitor
    decls = declarations(rs)
    small = {n: m.model_copy(update={"drift_window": 200, "drift_persist_windows": 2, "retrain_cooldown_s": 0})
             for n, m in decls.models.items()}
    mon = Monitor(rs, decls.model_copy(update={"models": small}))
    rng = np.random.default_rng(5)
    versions = {}
    for name in ("m_bin", "m_custom"):
        x = rng.normal(size=(400, 3))
        ref = pd.DataFrame(x, columns=FEATURES).assign(score=rng.random(400))
        versions[name], _ = register_version(rs, name, Logistic(3), FEATURES, ref, onnx_bytes=None, challenger=False)

    def window(name: str, shift: float) -> list:
        x = rng.normal(size=(200, 3)) + shift
        return [mon.add(Prediction(key="i1", model_name=name, model_version=versions[name], score=float(rng.random()),
                                   features=dict(zip(FEATURES, map(float, r), strict=True)), latency_s=0))
                for r in x][-1]

    assert mon.add(Prediction(key="i1", model_name="ghost", model_version="1", score=0.5, features={},
                              latency_s=0)) is None  # not declared: skipped
    reports = [window("m_bin", 3.0), window("m_custom", 0.0), window("m_bin", 3.0), window("m_custom", 0.0)]
    assert [r.drifted for r in reports] == [True, False, True, False]
    assert [r.model_name for r in reports] == ["m_bin", "m_custom", "m_bin", "m_custom"]
    with alert_webhook(mon) as (base, auth):
        url = f"{base}/alerts"
        ok = requests.post(url, json={"model_name": "m_reg", "source": "grafana"}, headers=auth, timeout=5)
        missing = requests.post(url, json={"source": "grafana"}, headers=auth, timeout=5)
        unknown = requests.post(url, json={"model_name": "ctr"}, headers=auth, timeout=5)
    assert ok.status_code == 202 and missing.status_code == 422 and unknown.status_code == 404
    assert unknown.json()["models"] == ["m_bin", "m_custom", "m_flaky", "m_mc", "m_reg"]
    assert "m_bin" in unknown.json()["error"]
    reqs = [RetrainRequest.from_bytes(m.value()) for m in read_topic(rs, "retrain.requests", 20, timeout=5)]
    asked = [(r.model_name, r.reason) for r in reqs if r.reason in ("drift", "webhook")]
    assert asked == [("m_bin", "drift"), ("m_reg", "webhook")]
    drift_req = next(r for r in reqs if r.reason == "drift")
    assert drift_req.since_ts == reports[0].window_start_ts and len(drift_req.evidence["windows"]) == 2



def test_training_quota_refuses_a_request_over_the_models_daily_budget(rs: Settings, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    from driftloop.core.usage import totals

    s = rs.model_copy(update={"state_db": f"sqlite:///{tmp_path / 'state.db'}", "train_budget_s": 0.001})
    monkeypatch.setenv("FLAKY_COUNTER", str(tmp_path / "calls"))
    monkeypatch.setenv("FLAKY_FAILURES", "0")
    ctl = Controller(s, LocalLauncher())
    first = ctl.handle(RetrainRequest(model_name="m_flaky", reason="manual"))  # nothing used yet: it trains
    assert first is not None and (tmp_path / "calls").read_text() == "1"
    trained_s = next(h["detail"]["seconds"] for h in ctl.store.get(first.request_id).history
                     if h["state"] == "evaluating" and "seconds" in (h["detail"] or {}))
    used = totals(s, model="m_flaky")["m_flaky"]["training_seconds"]
    assert used == pytest.approx(trained_s * s.train_workers, rel=1e-3, abs=1e-3)

    refused = ctl.handle(RetrainRequest(model_name="m_flaky", reason="manual"))
    assert isinstance(refused, ModelRejected) and refused.outcome == "refused", refused
    assert refused.checks["quota"].startswith("training compute budget spent: ")
    assert (tmp_path / "calls").read_text() == "1"  # no second training run
    status = [RetrainStatus.from_bytes(m.value()) for m in read_all(s, "retrain.status")]
    last = [x for x in status if x.request_id == refused.request_id]
    assert [x.state for x in last] == ["refused"] and "budget" in last[0].detail["checks"]["quota"]
    rejected = [ModelRejected.from_bytes(m.value()) for m in read_all(s, "models.rejected")]
    assert [r.outcome for r in rejected if r.request_id == refused.request_id] == ["refused"]
