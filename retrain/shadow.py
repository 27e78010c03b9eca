"""Live evidence for a challenger that serving has shadow-scored.

Serving publishes the champion's predictions on ``predictions`` and the challenger's on
``predictions.shadow`` (``core/contracts.Prediction``). :func:`shadow_result` reads both topics from the
offsets of records published at or after ``since_us`` (``offsets_for_times``, partitions assigned, no
consumer group, no commits) up to their ends, keeps the model's predictions of the two versions (the last
one per event), joins the events' labels from the Delta ``labels`` table and scores both models on the
events that have both predictions and a usable label, with the model's primary metric.

Bounded: at most ``max_records`` records are read per topic (the oldest ones from ``since_us``) and
each read stops after ``READ_TIMEOUT_S``; the champion's topic is filtered to the challenger's events as
it is read. The broker may report a partition's end one batch too low (Tansu, ARCHITECTURE.md), so a read
goes on until the record before the reported end arrived and a few polls in a row brought nothing.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer

from driftloop.core import delta
from driftloop.core import model_metrics as m
from driftloop.core.declarations import ModelSpec
from driftloop.core.kafka import consumer_config, read_past_reported_end
from driftloop.core.settings import Settings
from driftloop.retrain.data import usable_labels

log = logging.getLogger(__name__)

CHAMPION_TOPIC, CHALLENGER_TOPIC = "predictions", "predictions.shadow"
LABELS = "labels"  # the Delta labels table (features/training.py)
READ_TIMEOUT_S = 30.0
IDLE_POLLS = 2  # empty polls after the reported ends before a read ends
BOOTSTRAP_ROUNDS = 100
BOOTSTRAP_MAX_ROWS = 10_000  # bounds the bootstrap's cost (about 0.5 s for AUC)
SEED = 0


@dataclass
class ShadowResult:
    """Both models' primary metric on the same labelled live events; ``difference_se``: the bootstrap
    standard error of (challenger − champion) over those events (0: unknown)."""

    rows: int
    challenger: float
    champion: float
    metric: str
    version: str
    champion_version: str
    difference_se: float = 0.0


def read_predictions(settings: Settings, topic: str, spec: ModelSpec, version: str, since_us: int,
                     max_records: int = 200_000, only: set[str] | None = None) -> dict[str, Any]:
    """``event_id -> output`` of model ``spec`` at ``version`` on logical ``topic``, from the records
    published at or after ``since_us`` (``only``: keep these events only). Outputs: binary P(positive) or
    the regression value (floats), multiclass the probability lists."""
    full = settings.topic(topic)
    out: dict[str, Any] = {}
    c = Consumer(consumer_config(settings, f"{settings.topic_prefix}shadow-{uuid.uuid4().hex[:8]}"))
    try:
        parts = sorted(c.list_topics(full, timeout=10).topics[full].partitions)
    finally:
        c.close()
    records = read_past_reported_end(settings, full, parts, IDLE_POLLS, READ_TIMEOUT_S, from_time_ms=since_us // 1000)
    try:
        for read, msg in enumerate(records, 1):
            _keep(msg.value(), spec, version, only, out)
            if read >= max_records:
                break
    except TimeoutError as e:
        log.warning("%s: stopped reading %s (%d records so far): %s", spec.name, full, len(out), e)
    finally:
        records.close()
    return out


def _keep(raw: bytes | None, spec: ModelSpec, version: str, only: set[str] | None, out: dict[str, Any]) -> None:
    """Add one prediction record's output to ``out`` when it is the model's, of ``version``, and usable."""
    try:
        rec = orjson.loads(raw or b"")
        if rec["model_name"] != spec.name or str(rec["model_version"]) != version:
            return
        eid = rec["event_id"]
        if only is not None and eid not in only:
            return
        if spec.task == "multiclass":
            probs = rec.get("probabilities")
            if isinstance(probs, list) and len(probs) == spec.n_outputs:
                out[eid] = [float(p) for p in probs]
        else:
            out[eid] = float(rec["score"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return  # not a prediction record: not evidence


def labels_of(settings: Settings, spec: ModelSpec, events: list[str]) -> pd.DataFrame:
    """``event_id, label`` of ``events`` for the model, usable labels only. The newest row of an event wins:
    the last written (``created``; a table's files are not read in commit order)."""
    dt = delta.open_table(settings.offline_dir / LABELS)
    if dt is None or not events:
        return pd.DataFrame({"event_id": pd.Series(dtype=str), "label": pd.Series(dtype="float64")})
    cond = (pc.field("model_name") == spec.name) & pc.field("event_id").isin(pa.array(events, pa.string()))
    df = dt.to_pyarrow_dataset().to_table(columns=["event_id", "label", "created"], filter=cond).to_pandas()
    df = df.sort_values("created", kind="stable").drop_duplicates("event_id", keep="last")
    return usable_labels(df[["event_id", "label"]], spec)


def paired_se(metric: str, y: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int = BOOTSTRAP_ROUNDS,
              seed: int = SEED) -> float:
    """Bootstrap standard error of ``metric(y, a) - metric(y, b)``, resampling events (both models on the
    same resample); 0 when it cannot be estimated. Above ``BOOTSTRAP_MAX_ROWS`` events it is estimated on
    a random subset of that size and scaled by sqrt(subset / n) (the error shrinks as 1 / sqrt(n))."""
    f, rng, n = m.FUNCTIONS[metric], np.random.default_rng(seed), len(y)
    scale = 1.0
    if n > BOOTSTRAP_MAX_ROWS:
        keep = rng.choice(n, BOOTSTRAP_MAX_ROWS, replace=False)
        y, a, b, scale, n = y[keep], a[keep], b[keep], float(np.sqrt(BOOTSTRAP_MAX_ROWS / n)), BOOTSTRAP_MAX_ROWS
    diffs = []
    for _ in range(rounds):
        i = rng.integers(0, n, n)
        diffs.append(f(y[i], a[i]) - f(y[i], b[i]))
    d = np.asarray(diffs, np.float64)
    d = d[np.isfinite(d)]
    return scale * float(np.std(d, ddof=1)) if len(d) > 1 else 0.0


def shadow_result(settings: Settings, spec: ModelSpec, version: str, champion_version: str, since_us: int,
                  max_records: int = 200_000) -> ShadowResult | None:
    """Challenger ``version`` vs ``champion_version`` on the live events both scored since ``since_us`` that
    have a label; None when fewer than ``spec.shadow_min_rows`` such events."""
    version, champion_version = str(version), str(champion_version)
    mine = read_predictions(settings, CHALLENGER_TOPIC, spec, version, since_us, max_records)
    if len(mine) < spec.shadow_min_rows:
        return None
    theirs = read_predictions(settings, CHAMPION_TOPIC, spec, champion_version, since_us, max_records, set(mine))
    labels = labels_of(settings, spec, sorted(theirs))
    if len(labels) < spec.shadow_min_rows:
        log.info("%s v%s: %d labelled shadow events < %d", spec.name, version, len(labels), spec.shadow_min_rows)
        return None
    ids = labels["event_id"].tolist()
    y = labels["label"].to_numpy(np.float64)
    a = np.asarray([mine[e] for e in ids], np.float64)
    b = np.asarray([theirs[e] for e in ids], np.float64)
    f = m.FUNCTIONS[spec.metric]
    return ShadowResult(rows=len(ids), challenger=f(y, a), champion=f(y, b), metric=spec.metric, version=version,
                        champion_version=champion_version, difference_se=paired_se(spec.metric, y, a, b))
