"""Shadow evidence (retrain/shadow.py) from real prediction topics on the embedded broker and a real Delta
labels table, against a pandas + sklearn computation of the same join."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import sklearn.metrics as skm

from driftloop.core import delta
from driftloop.core.contracts import Prediction, now_us
from driftloop.core.declarations import LabelSpec, ModelSpec
from driftloop.core.kafka import flush_or_raise, make_producer, produce_raw
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.retrain.shadow import shadow_result

LABEL = LabelSpec(kind="field", topic="x.labels", id_field="eid")
BIN = ModelSpec(name="m", task="binary", metric="log_loss", higher_is_better=False, topic="events.x", key="k",
                feature_service="x_v1", features=["f"], label=LABEL, shadow_min_rows=200)
MC = BIN.model_copy(update={"name": "mc", "task": "multiclass", "classes": ["a", "b", "c"]})
N = 400


def _prediction(model: str, version: str, eid: str, out: float | list[float]) -> Prediction:
    score, probs = (float(np.argmax(out)), out) if isinstance(out, list) else (out, None)
    return Prediction(key=eid, model_name=model, model_version=version, score=score, probabilities=probs,
                      features={"f": 0.0}, latency_s=0.0, event_id=eid, ts=1_700_000_000_000_000)


@pytest.fixture(scope="module")
def live(tmp_path_factory, bootstrap_servers) -> dict:
    """Both prediction topics and the labels table of two models (binary ``m``, multiclass ``mc``): records
    from before ``since`` (to be left out), the models' champion ``1`` and challenger ``2`` on the same
    events, another challenger and another model on the same events, events one model scored only,
    events with no label, a corrected label, a label that does not fit the task."""
    s = Settings(data_dir=tmp_path_factory.mktemp("shadow") / "data", bootstrap_servers=bootstrap_servers,
                 topic_prefix=f"s{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(s, ["predictions", "predictions.shadow"])
    rng = np.random.default_rng(0)
    ids = [f"e{i}" for i in range(N)]
    y = rng.integers(0, 2, N).astype(float)
    champ = np.clip(0.5 + (y - 0.5) * rng.uniform(0.0, 0.8, N), 0.01, 0.99)
    chal = np.clip(0.5 + (y - 0.5) * rng.uniform(-0.2, 0.9, N), 0.01, 0.99)
    k = rng.integers(0, 3, N).astype(float)
    p_champ, p_chal = rng.dirichlet([1, 1, 1], N), rng.dirichlet([1, 1, 1], N)
    p_chal[np.arange(N), k.astype(int)] += 1.0
    p_chal /= p_chal.sum(axis=1, keepdims=True)

    recs: list[tuple[str, Prediction]] = []  # (topic, record), published after `since`
    for i, e in enumerate(ids):
        if i >= 370:  # no champion prediction for these
            recs.append(("predictions.shadow", _prediction("m", "2", e, chal[i])))
        else:
            recs += [("predictions.shadow", _prediction("m", "2", e, chal[i])),
                     ("predictions", _prediction("m", "1", e, champ[i])),
                     ("predictions.shadow", _prediction("m", "9", e, 0.5)),  # another challenger
                     ("predictions", _prediction("m", "0", e, 0.5)),  # an older champion
                     ("predictions.shadow", _prediction("mc", "2", e, p_chal[i].tolist())),
                     ("predictions", _prediction("mc", "1", e, p_champ[i].tolist()))]
        if i < 40:  # scored twice (a re-delivered batch)
            recs.append(("predictions.shadow", _prediction("m", "2", e, chal[i])))
    old = [f"old{i}" for i in range(60)]  # before `since`: with labels and both predictions, yet not evidence
    producer = make_producer(s)
    before_ms = now_us() // 1000 - 60_000
    for e in old:
        for topic, version in (("predictions.shadow", "2"), ("predictions", "1")):
            produce_raw(producer, s.topic(topic), e.encode(), _prediction("m", version, e, 0.99).to_bytes(),
                        timestamp=before_ms)
    flush_or_raise(producer)
    time.sleep(0.01)
    since = now_us()
    for topic, rec in recs:
        produce_raw(producer, s.topic(topic), rec.key.encode(), rec.to_bytes())
    flush_or_raise(producer)

    labelled = ids[:350] + old  # e350..e399: no label yet
    lab = pd.DataFrame({"model_name": "m", "event_id": labelled, "label": np.r_[y[:350], np.zeros(60)]})
    lab_mc = pd.DataFrame({"model_name": "mc", "event_id": ids[:350], "label": k[:350]})
    other = lab.assign(model_name="other", label=1 - lab["label"])
    wrong = lab.head(25).assign(label=1 - lab["label"].head(25))  # corrected by the later commit
    misfit = pd.DataFrame({"model_name": "m", "event_id": ids[340:345], "label": 0.5})  # last word: unusable
    _append(s, wrong, 1)
    _append(s, pd.concat([lab, lab_mc, other], ignore_index=True), 2)
    _append(s, misfit, 3)
    return {"s": s, "since": since, "ids": ids, "y": y, "champ": champ, "chal": chal, "k": k, "p_champ": p_champ,
            "p_chal": p_chal}


def _append(s: Settings, df: pd.DataFrame, minute: int) -> None:
    """One commit of rows to the labels table, with the columns the streams worker writes (``created``: when)."""
    t = pd.Timestamp("2023-11-14", tz="UTC")
    out = df.assign(key=df["event_id"], ts=1_700_000_000_000_000, event_timestamp=t,
                    created=t + pd.Timedelta(minutes=minute), _topic="labels",
                    _partition=0, _offset=np.arange(len(df)))
    delta.append(s.offline_dir / "labels", pa.Table.from_pandas(out, preserve_index=False))


def _expected(live: dict, chal: np.ndarray, champ: np.ndarray, labels: np.ndarray,
              unusable: range = range(0)) -> pd.DataFrame:
    """The events with both predictions and a usable label (``unusable``: events whose last label is not), with
    pandas."""
    ids = pd.Series(live["ids"])
    a = pd.DataFrame({"event_id": ids, "a": list(chal)})
    b = pd.DataFrame({"event_id": ids[:370], "b": list(champ[:370])})
    lab = pd.DataFrame({"event_id": ids[:350], "label": labels[:350]}).drop(index=list(unusable))
    return a.merge(b, on="event_id").merge(lab, on="event_id")


def test_binary_shadow_result_matches_pandas(live):
    t = time.perf_counter()
    res = shadow_result(live["s"], BIN, "2", "1", live["since"])
    took = time.perf_counter() - t
    want = _expected(live, live["chal"], live["champ"], live["y"], unusable=range(340, 345))
    assert res is not None and res.rows == len(want) == 345
    y, a, b = want["label"].to_numpy(), want["a"].to_numpy(float), want["b"].to_numpy(float)
    assert res.challenger == pytest.approx(skm.log_loss(y, a)) and res.champion == pytest.approx(skm.log_loss(y, b))
    assert (res.metric, res.version, res.champion_version) == ("log_loss", "2", "1")
    # log-loss is a mean of per-event losses: the paired difference's standard error is their spread / sqrt(n)
    d = -(y * np.log(a) + (1 - y) * np.log(1 - a)) + (y * np.log(b) + (1 - y) * np.log(1 - b))
    assert res.difference_se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=0.3)
    assert took < 10


def test_multiclass_shadow_result_matches_pandas(live):
    spec = MC.model_copy(update={"metric": "accuracy", "higher_is_better": True})
    res = shadow_result(live["s"], spec, "2", "1", live["since"])
    want = _expected(live, live["p_chal"], live["p_champ"], live["k"])
    assert res is not None and res.rows == len(want) == 350
    y = want["label"].to_numpy()
    a, b = np.stack(want["a"].to_numpy()), np.stack(want["b"].to_numpy())
    assert res.challenger == pytest.approx(skm.accuracy_score(y, a.argmax(axis=1)))
    assert res.champion == pytest.approx(skm.accuracy_score(y, b.argmax(axis=1)))
    ll = shadow_result(live["s"], MC, "2", "1", live["since"])
    assert ll is not None and ll.challenger == pytest.approx(skm.log_loss(y, a, labels=[0, 1, 2]))


def test_too_little_evidence_is_none(live):
    s, since = live["s"], live["since"]
    assert shadow_result(s, BIN.model_copy(update={"shadow_min_rows": 346}), "2", "1", since) is None
    assert shadow_result(s, BIN, "5", "1", since) is None  # never shadow-scored
    assert shadow_result(s, BIN, "2", "7", since) is None  # compared with a champion that scored nothing
    assert shadow_result(s, BIN, "2", "1", now_us() + 3_600_000_000, max_records=50) is None  # bounded read
