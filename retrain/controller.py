"""The retraining controller: ``retrain.requests`` → training set → Ray job → MLflow → gate → alias.

A challenger is promoted (alias ``champion`` moved, ``models.promoted`` published) only when its log
loss on the newest 20 % of the training window beats the champion's on the same rows; otherwise
``models.rejected`` says why. With no champion, it publishes a ``bootstrap`` request itself once
enough labelled events exist, and again if that one did not produce a champion. A request's offset
is committed after its outcome is published.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from driftloop.features.training import count_labels, training_set
from driftloop.features.vectors import FEATURE_COLUMNS, to_matrix
from driftloop.registry import models
from driftloop.core.contracts import ModelPromoted, ModelRejected, RetrainRequest, now_us
from driftloop.core.kafka import flush_or_raise, good_messages, make_consumer, make_producer, produce_event
from driftloop.core.metrics import TRAINING_RUNS
from driftloop.core.settings import Settings
from driftloop.core.worker import StopFlag, mark_ready
from driftloop.retrain.launcher import Launcher, RayLauncher
from driftloop.retrain.model import ClickMLP, log_loss, to_onnx

log = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
MIN_ROWS = 200
MIN_IMPROVEMENT = 1e-3  # log loss the challenger must gain over the champion on the same rows

BOOTSTRAP_RETRY_S = 15.0  # after a bootstrap request that did not produce a champion


class Controller:
    def __init__(self, settings: Settings, launcher: Launcher):
        self.s = settings
        self.launcher = launcher
        self.producer = make_producer(settings)
        self.last_promotion_us = 0

    def wait_for_labels(self, since_ts: int | None, need: int, stop: StopFlag | None = None) -> int:
        deadline = time.monotonic() + self.s.retrain_wait_s
        n = count_labels(self.s.offline_dir, since_ts)
        while n < need and time.monotonic() < deadline and not stop:
            time.sleep(2.0)
            n = count_labels(self.s.offline_dir, since_ts)
        return n

    def handle(self, req: RetrainRequest, stop: StopFlag | None = None) -> ModelPromoted | ModelRejected | None:
        if req.ts < self.last_promotion_us:
            log.info("request %s predates the last promotion: superseded", req.request_id)
            return None
        timeline = {"request": req.ts, "handled": now_us()}
        need = self.s.min_labels_first_model if req.reason == "bootstrap" else self.s.min_labels_retrain
        self.wait_for_labels(req.since_ts, need, stop)
        df, versions = training_set(self.s, req.since_ts, self.s.train_max_rows)
        if len(df) < MIN_ROWS:
            return self._reject(req, None, None, {"rows": f"{len(df)} labelled rows < {MIN_ROWS}"})
        cut = int(len(df) * (1 - HOLDOUT_SHARE))
        train, hold = df.iloc[:cut], df.iloc[cut:]
        x_tr, y_tr = to_matrix(train), train["label"].to_numpy(np.float32)
        x_ho, y_ho = to_matrix(hold), hold["label"].to_numpy(np.float32)

        timeline["job_submitted"] = now_us()
        result = self.launcher.run(x_tr, y_tr, {"epochs": 40})
        timeline["job_started"], timeline["job_finished"] = result.started_us, result.finished_us
        model = ClickMLP(len(FEATURE_COLUMNS))
        model.load_state_dict(torch.load(io.BytesIO(result.state_dict)))
        model.eval()
        with torch.no_grad():
            p_new = model(torch.from_numpy(x_ho)).numpy().reshape(-1)
        onnx_bytes = to_onnx(model, len(FEATURE_COLUMNS))
        metrics = {"holdout_logloss": log_loss(y_ho, p_new), "train_logloss": result.history[-1],
                   "rows": float(len(df)), "holdout_rows": float(len(hold)), "train_seconds": result.seconds}

        champ_version = models.alias_version(self.s)
        if champ_version is not None:
            champ = models.load_scorer(self.s, champ_version, FEATURE_COLUMNS)
            metrics["champion_holdout_logloss"] = log_loss(y_ho, champ.score(x_ho))

        ref = pd.DataFrame(x_ho, columns=FEATURE_COLUMNS)  # the model's inputs (missing values as served: 0)
        ref["score"] = p_new
        params = {"reason": req.reason, "request_id": req.request_id, "since_ts": req.since_ts,
                  "device": result.device, **{f"delta_version.{k}": v for k, v in versions.items()}}
        version, run_id = models.register_version(self.s, model, FEATURE_COLUMNS, ref, onnx_bytes=onnx_bytes,
                                                  params=params, metrics=metrics, history=result.history)
        timeline["registered"] = now_us()
        TRAINING_RUNS.labels(outcome="trained").inc()
        if champ_version is not None and metrics["holdout_logloss"] > \
                metrics["champion_holdout_logloss"] - MIN_IMPROVEMENT:
            return self._reject(req, version, run_id, {
                "gate": f"holdout log loss {metrics['holdout_logloss']:.4f} does not beat champion "
                        f"v{champ_version} {metrics['champion_holdout_logloss']:.4f} by {MIN_IMPROVEMENT}"})
        ev = models.promote(self.s, self.producer, version, reason=req.reason, metrics=metrics,
                            request_id=req.request_id, timeline=timeline)
        self.last_promotion_us = ev.timeline["promoted"]
        return ev

    def _reject(self, req: RetrainRequest, version: str | None, run_id: str | None,
                checks: dict[str, str]) -> ModelRejected:
        TRAINING_RUNS.labels(outcome="rejected").inc()
        ev = ModelRejected(model_name=self.s.model_name, version=version, run_id=run_id, checks=checks,
                           request_id=req.request_id)
        produce_event(self.producer, self.s, "models.rejected", ev, self.s.model_name)
        flush_or_raise(self.producer)
        log.warning("rejected %s: %s", version, checks)
        return ev

    def bootstrap_request(self) -> RetrainRequest | None:
        """A request for the first champion, once enough labels exist."""
        if models.alias_version(self.s) is not None:
            return None
        n = count_labels(self.s.offline_dir)
        if n < self.s.min_labels_first_model:
            return None
        req = RetrainRequest(model_name=self.s.model_name, reason="bootstrap", evidence={"labels": n})
        produce_event(self.producer, self.s, "retrain.requests", req, self.s.model_name)
        flush_or_raise(self.producer)
        return req


def run(settings: Settings, launcher: Launcher | None = None) -> None:
    stop = StopFlag()
    consumer = make_consumer(settings, f"{settings.topic_prefix}retrain", ["retrain.requests"])
    ctl = Controller(settings, launcher or RayLauncher(settings))
    mark_ready(settings, "retrain")
    next_bootstrap = 0.0  # while there is no champion: when to check for enough labels again
    try:
        while not stop:
            for m in good_messages(consumer.consume(10, 0.5)):
                try:
                    req = RetrainRequest.from_bytes(m.value())
                except (ValidationError, ValueError) as e:
                    log.warning("skipping malformed retrain request at offset %s: %s", m.offset(), e)
                else:
                    if req.model_name == settings.model_name:
                        try:
                            ctl.handle(req, stop)
                        except Exception as e:  # a failed job must not take the controller down
                            log.exception("request %s failed", req.request_id)
                            ctl._reject(req, None, None, {"error": f"{type(e).__name__}: {e}"[:500]})
                        if req.reason == "bootstrap":  # handled: if it did not promote, try again later
                            next_bootstrap = time.monotonic() + BOOTSTRAP_RETRY_S
                consumer.commit(message=m, asynchronous=False)
            if time.monotonic() >= next_bootstrap:
                sent = ctl.bootstrap_request() is not None
                next_bootstrap = time.monotonic() + (float("inf") if sent else 3.0)
    finally:
        consumer.close()
        ctl.launcher.close()
