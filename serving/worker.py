"""The streaming inference consumer: impressions → online features → champion score → ``predictions``.

* Scales by partitions (one consumer group); scores a batch (``serving_batch_size`` records or
  ``serving_linger_s``) with one online-feature lookup and one model call.
* Offsets are committed only after the batch's predictions are acknowledged by the broker, so a crash
  re-scores at most the records after the last commit (never loses one).
* Hot swap (``ModelSlot``): ``models.promoted`` or an alias poll (``serving_alias_poll_s``) starts a
  background load + verification; the verified version replaces one reference between batches.
* Shadow: with ``serving_shadow``, the ``challenger`` version (when it is not the champion) scores the
  same vectors and its predictions go to ``predictions.shadow``.

Records that fail validation are skipped here (the streams worker dead-letters them).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer
from pydantic import ValidationError

from driftloop.features.online_read import OnlineReader
from driftloop.features.repo import open_store
from driftloop.features.vectors import FEATURE_COLUMNS, FEATURE_SERVICE, ONLINE_FEATURES, request_matrix
from driftloop.registry import models
from driftloop.core.contracts import Impression, ModelRejected, Prediction
from driftloop.core.kafka import (
    flush_or_raise,
    good_messages,
    make_consumer,
    make_producer,
    produce_event,
    produce_raw,
)
from driftloop.core.metrics import BATCH_SIZE, EVENTS_IN, PREDICTION_LATENCY, PREDICTIONS
from driftloop.core.settings import Settings
from driftloop.core.worker import StopFlag, mark_ready
from driftloop.serving.model_slot import ModelSlot

log = logging.getLogger(__name__)


class BatchScorer:
    """Turns a batch of impressions into feature vectors (one online lookup) and prediction records."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.store = open_store(settings)
        self.reader = OnlineReader(self.store, FEATURE_SERVICE, ONLINE_FEATURES, "user_id")

    def online_features(self, users: list[str]) -> np.ndarray:
        """ONLINE_FEATURES for each user (missing = 0): one online-store read for the batch's unique users."""
        return self.reader.matrix(users)

    def vectors(self, imps: list[Impression]) -> np.ndarray:
        req = request_matrix(imp.__dict__ for imp in imps)
        return np.hstack([req, self.online_features([i.user_id for i in imps])])

    @staticmethod
    def records(imps: list[Impression], x: np.ndarray, scorer: models.Scorer, scores: np.ndarray,
                now_s: float) -> list[tuple[bytes, bytes, float]]:
        """(key, value, latency) per prediction, serialised straight from the batch arrays."""
        out = []
        rows = x.tolist()
        for imp, row, sc in zip(imps, rows, np.clip(scores, 0.0, 1.0).tolist(), strict=True):
            latency = max(0.0, now_s - imp.ts / 1e6)
            value = orjson.dumps({"schema_version": Prediction.SCHEMA_VERSION, "event_id": imp.event_id, "ts": imp.ts,
                                  "user_id": imp.user_id, "model_name": scorer.name,
                                  "model_version": scorer.version, "score": sc,
                                  "features": dict(zip(FEATURE_COLUMNS, row, strict=True)), "latency_s": latency})
            out.append((imp.user_id.encode(), value, latency))
        return out


def parse_impressions(msgs: list[Any]) -> list[Impression]:
    out = []
    for m in msgs:
        try:
            out.append(Impression.model_validate_json(m.value()))
        except (ValidationError, ValueError):
            continue
    return out


def run(settings: Settings) -> None:
    stop = StopFlag()
    producer = make_producer(settings)
    predictions, shadow_topic = settings.topic("predictions"), settings.topic("predictions.shadow")

    def on_reject(alias: str) -> Any:
        def hook(version: str, check: str, why: str) -> None:
            ev = ModelRejected(model_name=settings.model_name, version=version, run_id=None,
                               checks={f"serving_verification.{check}": why, "alias": alias})
            produce_event(producer, settings, "models.rejected", ev, settings.model_name)
            flush_or_raise(producer)
        return hook

    champion = ModelSlot(settings, FEATURE_COLUMNS, models.CHAMPION, on_reject(models.CHAMPION))
    challenger = ModelSlot(settings, FEATURE_COLUMNS, models.CHALLENGER, on_reject(models.CHALLENGER)) \
        if settings.serving_shadow else None
    slots = [s for s in (champion, challenger) if s is not None]
    batcher = BatchScorer(settings)
    consumer = make_consumer(settings, f"{settings.topic_prefix}serving", ["events.impressions"])
    control = make_consumer(settings, f"{settings.topic_prefix}serving-ctl-{uuid.uuid4().hex[:8]}",
                            ["models.promoted"], **{"auto.offset.reset": "latest"})
    for slot in slots:
        slot.refresh(wait=True)
        slot.swap_if_ready()
    mark_ready(settings, "serving")
    next_poll = time.monotonic() + settings.serving_alias_poll_s
    try:
        while not stop:
            msgs = good_messages(consumer.consume(settings.serving_batch_size, settings.serving_linger_s))
            if good_messages(control.consume(10, 0)) or time.monotonic() >= next_poll:
                next_poll = time.monotonic() + settings.serving_alias_poll_s
                for slot in slots:
                    slot.refresh()
            for slot in slots:
                slot.swap_if_ready()
            if not msgs:
                continue
            score_batch(msgs, batcher, champion.current, challenger.current if challenger else None,
                        producer, predictions, shadow_topic)
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        control.close()


def score_batch(msgs: list[Any], batcher: BatchScorer, model: models.Scorer | None,
                shadow: models.Scorer | None, producer: Producer, topic: str, shadow_topic: str) -> int:
    """Score one batch with ``model`` (and ``shadow``), publish, and wait for the broker's acks."""
    BATCH_SIZE.labels(component="serving").observe(len(msgs))
    EVENTS_IN.labels(component="serving", topic="events.impressions").inc(len(msgs))
    imps = parse_impressions(msgs)
    if model is None or not imps:
        return 0
    t0 = time.perf_counter()
    x = batcher.vectors(imps)
    t1 = time.perf_counter()
    outputs = [(topic, batcher.records(imps, x, model, model.score(x), time.time()))]
    if shadow is not None and shadow.version != model.version:
        outputs.append((shadow_topic, batcher.records(imps, x, shadow, shadow.score(x), time.time())))
    for t, recs in outputs:
        for key, value, _lat in recs:
            produce_raw(producer, t, key, value)
    t2 = time.perf_counter()
    flush_or_raise(producer)
    log.debug("batch of %d: features %.3fs, score+serialise %.3fs, publish %.3fs", len(imps), t1 - t0, t2 - t1,
              time.perf_counter() - t2)
    PREDICTIONS.labels(model_version=model.version).inc(len(imps))
    for _k, _v, lat in outputs[0][1]:
        PREDICTION_LATENCY.observe(lat)
    return len(imps)

