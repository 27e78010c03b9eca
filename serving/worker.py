"""The streaming inference consumer: impressions → online features → champion score → ``predictions``.

Offsets are committed only after the batch's predictions are acknowledged by the broker.
Records that fail validation are skipped here (the streams worker dead-letters them).
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import orjson
import pandas as pd
from pydantic import ValidationError

from driftloop.features.repo import open_store
from driftloop.features.vectors import FEATURE_COLUMNS, FEATURE_SERVICE, ONLINE_FEATURES, request_features, to_matrix
from driftloop.infra.contracts import Impression, ModelRejected, Prediction
from driftloop.infra.kafka import flush_or_raise, good_messages, make_consumer, make_producer, produce_event
from driftloop.infra.metrics import BATCH_SIZE, EVENTS_IN, PREDICTION_LATENCY, PREDICTIONS
from driftloop.infra.settings import Settings
from driftloop.infra.worker import StopFlag, mark_ready
from driftloop.serving.model_slot import ModelSlot

log = logging.getLogger(__name__)

ALIAS_POLL_S = 5.0


class Scorer:
    """Scores one batch of raw impression records with the slot's current model."""

    def __init__(self, settings: Settings, slot: ModelSlot):
        self.s = settings
        self.slot = slot
        self.store = open_store(settings)
        self.service = self.store.get_feature_service(FEATURE_SERVICE)

    def online_features(self, users: list[str]) -> pd.DataFrame:
        uniq = list(dict.fromkeys(users))
        got = self.store.get_online_features(features=self.service,
                                             entity_rows=[{"user_id": u} for u in uniq]).to_dict()
        df = pd.DataFrame({c: got.get(c, [None] * len(uniq)) for c in ONLINE_FEATURES}, index=uniq)
        return df.loc[users].reset_index(drop=True)

    def score(self, impressions: list[Impression]) -> list[Prediction]:
        model = self.slot.current
        if model is None or not impressions:
            return []
        req = pd.DataFrame([request_features(i.model_dump()) for i in impressions])
        df = pd.concat([req, self.online_features([i.user_id for i in impressions])], axis=1)
        x = to_matrix(df)
        scores = model.score(x)
        now = time.time()
        out = []
        for imp, row, sc in zip(impressions, x, scores, strict=True):
            out.append(Prediction(event_id=imp.event_id, ts=imp.ts, user_id=imp.user_id, model_name=model.name,
                                  model_version=model.version, score=float(np.clip(sc, 0.0, 1.0)),
                                  features=dict(zip(FEATURE_COLUMNS, map(float, row), strict=True)),
                                  latency_s=max(0.0, now - imp.ts / 1e6)))
        return out


def run(settings: Settings) -> None:
    stop = StopFlag()
    producer = make_producer(settings)

    def on_reject(version: str, why: str) -> None:
        ev = ModelRejected(model_name=settings.model_name, version=version, run_id=None,
                           checks={"serving_verification": why})
        produce_event(producer, settings, "models.rejected", ev, settings.model_name)
        producer.flush(10)

    slot = ModelSlot(settings, FEATURE_COLUMNS, on_reject)
    scorer = Scorer(settings, slot)
    consumer = make_consumer(settings, f"{settings.topic_prefix}serving", ["events.impressions"])
    control = make_consumer(settings, f"{settings.topic_prefix}serving-ctl-{uuid.uuid4().hex[:8]}",
                            ["models.promoted"], **{"auto.offset.reset": "latest"})
    slot.refresh(wait=True)
    slot.swap_if_ready()
    mark_ready(settings, "serving")
    next_poll = time.monotonic() + ALIAS_POLL_S
    try:
        while not stop:
            msgs = good_messages(consumer.consume(settings.serving_batch_size, settings.serving_linger_s))
            if good_messages(control.consume(10, 0)) or time.monotonic() >= next_poll:
                next_poll = time.monotonic() + ALIAS_POLL_S
                slot.refresh()
            slot.swap_if_ready()
            if not msgs:
                continue
            BATCH_SIZE.labels(component="serving").observe(len(msgs))
            EVENTS_IN.labels(component="serving", topic="events.impressions").inc(len(msgs))
            imps = []
            for m in msgs:
                try:
                    imps.append(Impression.model_validate(orjson.loads(m.value())))
                except (ValidationError, ValueError):
                    continue
            preds = scorer.score(imps)
            for p in preds:
                produce_event(producer, settings, "predictions", p, p.user_id)
                PREDICTION_LATENCY.observe(p.latency_s)
            if preds:
                flush_or_raise(producer)
                PREDICTIONS.labels(model_version=preds[0].model_version).inc(len(preds))
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        control.close()
