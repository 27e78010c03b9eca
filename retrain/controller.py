"""The retraining controller: ``retrain.requests`` → training set → Ray job → MLflow → gate → alias, per model.

A request names a declared model. Its labelled events (at least the model's ``min_labels``) are split
in time order: the newest 20 % are the holdout, a seeded 10 % of the rest validates the trainer, the
remainder trains it (the declared ``trainer`` or the built-in one for the task). The challenger is
registered, then promoted (alias ``champion`` moved, ``models.promoted`` published) only when it beats
the champion on the model's primary metric on the same holdout by the declared margin; otherwise
``models.rejected`` says why. For each model with no champion it publishes a ``bootstrap`` request itself
once enough labels exist, and again if that one did not produce a champion. A request's offset is
committed after its outcome is published.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from driftloop.core import model_metrics as m
from driftloop.core.contracts import ModelPromoted, ModelRejected, RetrainRequest, now_us
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.kafka import Deliveries, good_messages, make_consumer, make_producer
from driftloop.core.metrics import TRAINING_RUNS
from driftloop.core.settings import Settings
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.features.repo import declarations, on_path
from driftloop.features.training import count_labels, training_set
from driftloop.features.vectors import to_matrix
from driftloop.registry.aliases import promote
from driftloop.registry.verify import ModelCheckError, check_outputs, load_scorer
from driftloop.registry.versions import CHAMPION, alias_version, register_version
from driftloop.retrain.launcher import Launcher, RayLauncher, TrainJob
from driftloop.retrain.trainers import checked_onnx, outputs

log = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
VALID_SHARE = 0.1  # of the rows before the holdout
MIN_ROWS = 200
SEED = 0
BOOTSTRAP_RETRY_S = 15.0  # after a bootstrap request that did not produce a champion
BOOTSTRAP_POLL_S = 3.0


def split(df: pd.DataFrame, seed: int = SEED) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(train, valid, holdout) of a frame ordered oldest first: the newest 20 % hold out, a seeded 10 %
    of the rest validates."""
    cut = int(len(df) * (1 - HOLDOUT_SHARE))
    rest, hold = df.iloc[:cut], df.iloc[cut:]
    valid_idx = rest.sample(frac=VALID_SHARE, random_state=seed).index
    return rest.drop(index=valid_idx), rest.loc[valid_idx], hold


def usable_labels(df: pd.DataFrame, spec: ModelSpec) -> pd.DataFrame:
    """The rows whose label fits the task (finite; binary 0/1; multiclass a class index)."""
    y = pd.to_numeric(df["label"], errors="coerce")
    ok = np.isfinite(y)
    if spec.task == "binary":
        ok &= y.isin([0.0, 1.0])
    elif spec.task == "multiclass":
        ok &= (y == y.round()) & (y >= 0) & (y < spec.n_outputs)
    if not ok.all():
        log.warning("%s: %d rows with labels that do not fit a %s model dropped", spec.name, int((~ok).sum()),
                    spec.task)
    return df[ok].assign(label=y[ok].astype("float64"))


def reference_frame(x: np.ndarray, out: np.ndarray, spec: ModelSpec, labels: np.ndarray | None = None) -> pd.DataFrame:
    """The version's reference sample: its inputs (as served), its outputs on them (``score``; for a
    multiclass model ``p0..pK-1`` besides, and ``score`` = the most probable class) and, when given, their
    ``label`` (the drift monitor calibrates its label-free estimate on them)."""
    ref = pd.DataFrame(x, columns=spec.features)
    if spec.task == "multiclass":
        for i in range(out.shape[1]):
            ref[f"p{i}"] = out[:, i]
        ref["score"] = out.argmax(axis=1).astype("float64")
    else:
        ref["score"] = out
    if labels is not None:
        ref["label"] = labels
    return ref


def gate_failure(spec: ModelSpec, mine: float, theirs: float, champion: str | None) -> str | None:
    """Why the challenger's holdout metric ``mine`` fails the gate against the champion's ``theirs``; None
    when it passes (with no champion, any finite value passes)."""
    if champion is None:
        return None if np.isfinite(mine) else f"holdout {spec.metric} is {mine}"
    if m.better(mine, theirs, spec.higher_is_better, spec.gate_margin):
        return None
    return (f"holdout {spec.metric} {mine:.4f} does not beat champion v{champion} {theirs:.4f} by "
            f"{spec.gate_margin} ({'higher' if spec.higher_is_better else 'lower'} is better)")


class Controller:
    def __init__(self, settings: Settings, launcher: Launcher, decls: Declarations | None = None):
        self.s = settings
        self.launcher = launcher
        self.decls = decls or declarations(settings)
        self.producer = make_producer(settings)
        self.last_promotion_us: dict[str, int] = {}
        self.next_bootstrap: dict[str, float] = {}  # model → when to check it for a bootstrap again
        on_path(settings.feature_repo_dir)  # declared trainers' modules, and unpickling their models

    def wait_for_labels(self, spec: ModelSpec, since_ts: int | None, stop: StopFlag | None = None) -> int:
        deadline = time.monotonic() + self.s.retrain_wait_s
        n = count_labels(self.s.offline_dir, spec.name, since_ts)
        while n < spec.min_labels and time.monotonic() < deadline and not stop:
            time.sleep(2.0)
            n = count_labels(self.s.offline_dir, spec.name, since_ts)
        return n

    def handle(self, req: RetrainRequest, stop: StopFlag | None = None) -> ModelPromoted | ModelRejected | None:
        """Train, register and gate one request; None when a later promotion superseded it."""
        try:
            spec = self.decls.model(req.model_name)
        except KeyError as e:
            return self._reject(req, None, None, {"model": str(e.args[0])})
        if req.ts < self.last_promotion_us.get(spec.name, 0):
            log.info("%s request %s predates the last promotion: superseded", spec.name, req.request_id)
            return None
        timeline = {"request": req.ts, "handled": now_us()}
        n = self.wait_for_labels(spec, req.since_ts, stop)
        if n < spec.min_labels:
            return self._reject(req, None, None, {"labels": f"{n} labelled events < min_labels {spec.min_labels}"})
        df, versions = training_set(self.s, spec, req.since_ts, spec.train_max_rows)
        df = usable_labels(df, spec)
        if len(df) < MIN_ROWS:
            return self._reject(req, None, None, {"rows": f"{len(df)} labelled rows < {MIN_ROWS}"})
        train, valid, hold = split(df)
        job = TrainJob(model=spec.name, features=list(spec.features), task=spec.task, classes=list(spec.classes),
                       trainer=spec.trainer, repo=str(self.s.feature_repo_dir) if spec.trainer else None,
                       seed=SEED, epochs=spec.epochs)
        timeline["job_submitted"] = now_us()
        result = self.launcher.run(train, valid, job)
        timeline["job_started"], timeline["job_finished"] = result.started_us, result.finished_us

        x_ho, y_ho = to_matrix(hold, list(spec.features)), hold["label"].to_numpy(np.float64)
        where = f"{spec.name} challenger of request {req.request_id}"
        try:
            out = outputs(result.model, x_ho, spec.n_outputs)
            check_outputs(out, len(x_ho), spec.task, spec.n_outputs, where)
        except ModelCheckError as e:
            return self._reject(req, None, None, {e.check: str(e)})
        except Exception as e:  # a declared module that cannot score its own inputs
            return self._reject(req, None, None, {"outputs": f"{where}: scoring failed: {type(e).__name__}: {e}"})
        onnx_bytes, onnx_note = checked_onnx(result.model, x_ho, spec.n_outputs)
        if onnx_bytes is None:
            log.warning("%s: no ONNX copy (%s); serving will use torch", where, onnx_note)
        metrics = {f"holdout_{k}": v for k, v in m.evaluate(spec.task, y_ho, out).items()}
        metrics |= {"rows": float(len(df)), "train_rows": float(len(train)), "holdout_rows": float(len(hold)),
                    "train_seconds": result.seconds}
        if result.history:
            metrics["train_loss"] = result.history[-1]
        champ_version, theirs, champ_note = self.champion_metric(spec, x_ho, y_ho)
        if champ_version is not None:
            metrics[f"champion_holdout_{spec.metric}"] = theirs
        mine = metrics[f"holdout_{spec.metric}"]
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}  # e.g. no AUC of a one-class holdout
        params: dict[str, Any] = {"reason": req.reason, "request_id": req.request_id, "since_ts": req.since_ts,
                                  "device": result.device, "trainer": spec.trainer or f"builtin:{spec.task}",
                                  "seed": SEED, "epochs": spec.epochs, "onnx": onnx_note[:250],
                                  **{f"delta_version.{k}": v for k, v in versions.items()}}
        version, run_id = register_version(
            self.s, spec.name, result.model, spec.features, reference_frame(x_ho, out, spec, y_ho),
            onnx_bytes=onnx_bytes, task=spec.task, params=params,
            metrics=metrics, history=result.history)
        timeline["registered"] = now_us()
        TRAINING_RUNS.labels(model=spec.name, outcome="trained").inc()
        failed = gate_failure(spec, mine, theirs, champ_version)
        if failed:
            return self._reject(req, version, run_id, {"gate": failed})
        reason = req.reason if not champ_note else f"{req.reason} ({champ_note})"
        ev = promote(self.s, self.producer, spec.name, version, reason=reason[:500], metrics=metrics,
                     request_id=req.request_id, timeline=timeline)
        TRAINING_RUNS.labels(model=spec.name, outcome="promoted").inc()
        self.last_promotion_us[spec.name] = ev.timeline["promoted"]
        return ev

    def champion_metric(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[str | None, float, str]:
        """(champion version, its primary metric on ``x``/``y``, why it has none): a champion that cannot
        score these inputs (e.g. trained on features no longer declared) counts as none."""
        version = alias_version(self.s, spec.name, CHAMPION)
        if version is None:
            return None, float("nan"), ""
        try:
            champ = load_scorer(self.s, spec.name, version, list(spec.features), spec.task, spec.n_outputs,
                                verify_reference=False)
            return version, m.FUNCTIONS[spec.metric](y, champ.score(x)), ""
        except (ModelCheckError, MlflowException) as e:
            note = f"champion v{version} cannot score this holdout: {e}"
            log.warning("%s: %s; the challenger is gated against nothing", spec.name, note)
            return None, float("nan"), note

    def _reject(self, req: RetrainRequest, version: str | None, run_id: str | None,
                checks: dict[str, str], outcome: str = "rejected") -> ModelRejected:
        TRAINING_RUNS.labels(model=req.model_name, outcome=outcome).inc()
        ev = ModelRejected(model_name=req.model_name, version=version, run_id=run_id, checks=checks,
                           request_id=req.request_id)
        out = Deliveries(self.producer)
        out.event(self.s, "models.rejected", ev, req.model_name)
        out.wait()
        log.warning("rejected %s v%s: %s", req.model_name, version, checks)
        return ev

    def bootstrap_request(self, name: str) -> RetrainRequest | None:
        """A request for model ``name``'s first champion, once it has enough labels (and none is pending)."""
        spec = self.decls.model(name)
        if time.monotonic() < self.next_bootstrap.get(name, 0.0):
            return None
        self.next_bootstrap[name] = time.monotonic() + BOOTSTRAP_POLL_S
        if alias_version(self.s, name, CHAMPION) is not None:
            return None
        n = count_labels(self.s.offline_dir, name)
        if n < spec.min_labels:
            return None
        req = RetrainRequest(model_name=name, reason="bootstrap", evidence={"labels": n})
        out = Deliveries(self.producer)
        out.event(self.s, "retrain.requests", req, name)
        out.wait()
        self.next_bootstrap[name] = float("inf")  # until that request is handled
        log.info("%s: %d labels and no champion: bootstrap request %s", name, n, req.request_id)
        return req

    def bootstrap_requests(self) -> list[RetrainRequest]:
        """Bootstrap requests for every declared model that is due one."""
        return [r for name in self.decls.models if (r := self.bootstrap_request(name)) is not None]

    def handled(self, req: RetrainRequest) -> None:
        """After a bootstrap request: if it did not produce a champion, try again later."""
        if req.reason == "bootstrap" and req.model_name in self.decls.models:
            self.next_bootstrap[req.model_name] = time.monotonic() + BOOTSTRAP_RETRY_S


def run(settings: Settings, launcher: Launcher | None = None) -> None:
    stop = StopFlag()
    watch = DeclarationsWatch(settings)
    consumer = make_consumer(settings, f"{settings.topic_prefix}retrain", ["retrain.requests"])
    ctl = Controller(settings, launcher or RayLauncher(settings))
    log.info("retraining models %s", sorted(ctl.decls.models) or "none (nothing declared)")
    mark_ready(settings, "retrain")
    restart = False
    try:
        while not stop and not restart:
            for msg in good_messages(consumer.consume(1, 0.5)):
                try:
                    req = RetrainRequest.from_bytes(msg.value())
                except (ValidationError, ValueError) as e:
                    log.warning("skipping malformed retrain request at offset %s: %s", msg.offset(), e)
                else:
                    try:
                        ctl.handle(req, stop)
                    except Exception as e:  # a failed job must not take the controller down
                        log.exception("%s request %s failed", req.model_name, req.request_id)
                        ctl._reject(req, None, None, {"error": f"{type(e).__name__}: {e}"[:500]}, outcome="failed")
                    ctl.handled(req)
                consumer.commit(message=msg, asynchronous=False)
            restart = watch.changed()
            if not restart:
                ctl.bootstrap_requests()
    finally:
        consumer.close()
        ctl.launcher.close()
    if restart:
        raise SystemExit(RESTART_EXIT)
