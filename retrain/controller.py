"""The retraining controller: ``retrain.requests`` → training set → Ray Train → gate → MLflow → alias, per model.

Each request moves through persisted states (``core/requests.py``): **requested** → **data** (its
labelled events, at least the model's ``min_labels``, split in time order: the newest 20 % hold out, a
seeded 10 % of the rest validates; the frames are kept under ``<data_dir>/retrain/<request>``) →
**training** (a Ray Train run named after the request, checkpointed every epoch) → **evaluating**
(the gate, ``retrain/gate.py``, against the champion on the same holdout) → **promoted** (``champion``
moved through the alias ledger, ``models.promoted``) / **rejected** (``models.rejected`` with every
failed check) / **failed** (after ``retrain_max_attempts`` attempts with doubling backoff). Every move is
published on ``retrain.status``. A controller killed at any step resumes the request from its stored
state: the saved frames, the same Ray Train run (which restarts from its last checkpoint), the version
already registered for the request. A version is registered only with all its artifacts, its lineage
and its gate decision. For each model with no champion it publishes a ``bootstrap`` request itself
once enough labels exist. A request's offset is committed once it is stored (the store resumes it);
requests of different models run at once (``retrain_concurrency``), one at a time per model.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from driftloop.core.contracts import ModelPromoted, ModelRejected, RetrainRequest, RetrainStatus, now_us
from driftloop.core.deadletter import DeadLetters
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.frames import to_matrix
from driftloop.core.kafka import Deliveries, commit_or_warn, good_messages, make_consumer, make_producer
from driftloop.core.metrics import EVENTS_IN, RETRAIN_SECONDS, TRAINING_BUDGET, TRAINING_RUNS, StoreHealth, beat
from driftloop.core.requests import RequestStore, Stored
from driftloop.core.settings import Settings
from driftloop.core.usage import meter_training, training_used
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.features.repo import declarations, on_path
from driftloop.features.training import count_labels, training_set
from driftloop.registry.aliases import promote
from driftloop.registry.versions import (
    CHAMPION,
    alias_version,
    client,
    register_version,
    registered_for,
    registry_answers,
    registry_outage,
)
from driftloop.retrain.data import MIN_ROWS, SEED, split, usable_labels
from driftloop.retrain.evaluation import champion_outputs
from driftloop.retrain.gate import GateResult, run_gate
from driftloop.retrain.launcher import JobResult, Launcher, TrainJob, make_launcher
from driftloop.retrain.lineage import code_version
from driftloop.retrain.trainers import checked_onnx, outputs

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "holdout")
BOOTSTRAP_RETRY_S = 15.0  # after a bootstrap request that did not produce a champion
BOOTSTRAP_POLL_S = 3.0
REGISTRY = StoreHealth("retrain", "mlflow", "MLflow store unavailable (requests wait, spending no attempt)",
                       "MLflow store answers again", log)


class RegistryDown(Exception):
    """The MLflow store did not answer."""


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


CONTROLLER = "retrain-controller"


class Controller:
    def __init__(self, settings: Settings, launcher: Launcher, decls: Declarations | None = None):
        self.s = settings
        self.launcher = launcher
        self.decls = decls or declarations(settings)
        self.producer = make_producer(settings)
        self.store = RequestStore(settings)
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

    # -- states ---------------------------------------------------------------------------------------------

    def _move(self, row: Stored, state: str, detail: dict[str, Any] | None = None, **values: Any) -> Stored:
        """Persist the move, then announce it on ``retrain.status``."""
        row = self.store.move(row.request_id, state, detail, **values)
        out = Deliveries(self.producer)
        out.event(self.s, "retrain.status", RetrainStatus(request_id=row.request_id, model_name=row.model,
                                                          state=state, attempt=row.attempt, detail=detail or {}),
                  row.model)
        out.wait()
        return row

    def handle(self, req: RetrainRequest, stop: StopFlag | None = None) -> ModelPromoted | ModelRejected | None:
        """Take one request to its outcome (resuming it where a previous controller left it); None when it
        had one already."""
        row = self.store.add(req)
        if row.done:
            log.info("%s request %s already %s", req.model_name, req.request_id, row.state)
            return None
        try:
            spec = self.decls.model(req.model_name)
        except KeyError as e:
            return self._reject(row, {"model": str(e.args[0])})
        if req.ts < self.last_promotion_us.get(spec.name, 0):
            return self._reject(row, {"superseded": "a later promotion of this model came first"})
        while True:
            wait_s = (row.not_before_us - now_us()) / 1e6
            while wait_s > 0 and not stop:
                time.sleep(min(wait_s, 0.5))
                wait_s = (row.not_before_us - now_us()) / 1e6
            if stop:
                return None  # resumed by the next controller
            try:
                return self.attempt(row, spec, stop)
            except Exception as e:  # a failed step is retried; the stored state says where it resumes
                if registry_outage(e) or not registry_answers(self.s):  # MLflow, not the request: no attempt spent
                    self.wait_for_registry(e, stop)
                    continue
                error = f"{type(e).__name__}: {e}"[:500]
                log.exception("%s request %s attempt %d failed", spec.name, req.request_id, row.attempt + 1)
                attempt = row.attempt + 1
                if attempt >= self.s.retrain_max_attempts:
                    return self._reject(row, {"error": error}, outcome="failed", error=error, attempt=attempt)
                backoff = self.s.retrain_backoff_s * 2 ** (attempt - 1)
                row = self._move(row, "requested", {"error": error, "retry_in_s": backoff}, attempt=attempt,
                                 error=error, not_before_us=now_us() + int(backoff * 1e6))

    def attempt(self, row: Stored, spec: ModelSpec, stop: StopFlag | None) -> ModelPromoted | ModelRejected | None:
        """One attempt from the request's stored state to its outcome."""
        req = row.as_request()
        timeline = {"request": req.ts, "handled": now_us()}
        if row.state == "evaluating" and row.version is not None:
            return self._decide(row, spec, timeline)  # registered before a crash: only the decision is left
        frames = self._frames(row)
        if frames is None:
            over = self.over_quota(spec)  # a run already under way (its frames saved) is resumed regardless
            if over:
                return self._reject(row, {"quota": over}, outcome="refused")
            row = self._move(row, "data")
            n = self.wait_for_labels(spec, req.since_ts, stop)
            if stop:
                return None
            if n < spec.min_labels:
                return self._reject(row, {"labels": f"{n} labelled events < min_labels {spec.min_labels}"})
            df, versions = training_set(self.s, spec, req.since_ts, spec.train_max_rows)
            df = usable_labels(df, spec)
            if len(df) < MIN_ROWS:
                return self._reject(row, {"rows": f"{len(df)} labelled rows < {MIN_ROWS}"})
            frames = split(df)
            row = self._move(row, "training", data=self._save_frames(row, spec, frames, versions))
        elif row.state != "training":
            row = self._move(row, "training", {"resumed": True})
        train, valid, hold = frames
        job = TrainJob(model=spec.name, features=list(spec.features), task=spec.task, classes=list(spec.classes),
                       trainer=spec.trainer, repo=str(self.s.feature_repo_dir) if spec.trainer else None,
                       seed=SEED, epochs=spec.epochs, run_name=f"{spec.name}-{row.request_id}")
        timeline["job_submitted"] = now_us()
        result = self.launcher.run(train, valid, job)
        meter_training(self.s, spec.name, result.seconds * self.s.train_workers)
        timeline["job_started"], timeline["job_finished"] = result.started_us, result.finished_us
        row = self._move(row, "evaluating", {"device": result.device, "seconds": round(result.seconds, 3),
                                             "resumed_from_epoch": result.resumed_from_epoch})
        return self._evaluate(row, spec, result, hold, timeline)

    def wait_for_registry(self, error: BaseException, stop: StopFlag | None) -> None:
        """Until the MLflow store answers again (or the worker stops), reporting it down."""
        REGISTRY.failed(error)
        while not stop and not registry_answers(self.s):
            REGISTRY.failed(error)
            time.sleep(max(self.s.retrain_backoff_s, 0.5))
        if not stop:
            REGISTRY.ok()

    def over_quota(self, spec: ModelSpec) -> str | None:
        """Why a new training run of the model is refused (its compute budget for the last 24 h is spent),
        or None."""
        budget = spec.train_budget_s or self.s.train_budget_s
        TRAINING_BUDGET.labels(model=spec.name).set(budget or 0)
        if not budget:
            return None
        used = training_used(self.s, spec.name)
        if used < budget:
            return None
        return (f"training compute budget spent: {used:.0f} s used in the last 24 h of {budget:.0f} s per day "
                f"(RetrainPolicy(compute_budget_s=...) or DRIFTLOOP_TRAIN_BUDGET_S)")

    # -- data -----------------------------------------------------------------------------------------------

    def _request_dir(self, row: Stored) -> Path:
        return self.s.root / "retrain" / row.request_id

    def _save_frames(self, row: Stored, spec: ModelSpec, frames: tuple[pd.DataFrame, ...],
                     versions: dict[str, int | None]) -> dict[str, Any]:
        """Keep the split frames (a resumed request trains on exactly these) and describe them."""
        folder = self._request_dir(row)
        folder.mkdir(parents=True, exist_ok=True)
        for name, df in zip(SPLITS, frames, strict=True):
            tmp = folder / f".{name}.parquet"
            df.to_parquet(tmp)
            tmp.replace(folder / f"{name}.parquet")
        train, valid, hold = frames
        return {"folder": str(folder), "feature_service": spec.feature_service, "since_ts": row.request["since_ts"],
                "rows": {n: len(f) for n, f in zip(SPLITS, frames, strict=True)}, "delta_versions": versions,
                "seed": SEED, "holdout_ts": [int(hold["ts"].min()), int(hold["ts"].max())],
                "train_ts": [int(min(train["ts"].min(), valid["ts"].min())),
                             int(max(train["ts"].max(), valid["ts"].max()))]}

    def _frames(self, row: Stored) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame] | None:
        """The frames saved at the request's data step, when it got that far."""
        if not row.data:
            return None
        folder = Path(row.data["folder"])
        if not all((folder / f"{n}.parquet").exists() for n in SPLITS):
            return None
        train, valid, hold = (pd.read_parquet(folder / f"{n}.parquet") for n in SPLITS)
        return train, valid, hold

    # -- evaluation, registration, decision -----------------------------------------------------------------

    def _evaluate(self, row: Stored, spec: ModelSpec, result: JobResult, hold: pd.DataFrame,
                  timeline: dict[str, int]) -> ModelPromoted | ModelRejected:
        x_ho, y_ho = to_matrix(hold, list(spec.features)), hold["label"].to_numpy(np.float64)
        where = f"{spec.name} challenger of request {row.request_id}"
        try:
            out = outputs(result.model, x_ho, spec.n_outputs)
        except Exception as e:  # a declared module that cannot score its own inputs
            return self._reject(row, {"signature": f"{where}: scoring the holdout failed: {type(e).__name__}: {e}"})
        champ_version, champ_out, champ_note = champion_outputs(self.s, spec, x_ho)
        gate = run_gate(spec, hold, out, champ_out, champion_version=champ_version)
        if "signature" in gate.failed or "outputs" in gate.failed:
            return self._reject(row, gate.failed)  # nothing worth registering
        onnx_bytes, onnx_note = checked_onnx(result.model, x_ho, spec.n_outputs)
        if onnx_bytes is None:
            log.warning("%s: no ONNX copy (%s); serving will use torch", where, onnx_note)
        metrics = {**gate.metrics, "train_seconds": result.seconds}
        metrics |= {f"{k}_rows": float(v) for k, v in (row.data or {}).get("rows", {}).items()}
        if result.history:
            metrics["train_loss"] = result.history[-1]
        metrics = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}  # e.g. no AUC of a one-class holdout
        decision = "promote" if gate.passed else "reject"
        lineage = self._lineage(row, spec, result, gate, champ_version, champ_note, onnx_note)
        params: dict[str, Any] = {"reason": row.reason, "request_id": row.request_id, "device": result.device,
                                  "trainer": spec.trainer or f"builtin:{spec.task}", "seed": SEED,
                                  "epochs": spec.epochs, "onnx": onnx_note[:250],
                                  **{f"delta_version.{k}": v for k, v in (row.data or {})["delta_versions"].items()}}
        version, run_id = registered_for(self.s, spec.name, row.request_id) or register_version(
            self.s, spec.name, result.model, spec.features, reference_frame(x_ho, out, spec, y_ho),
            onnx_bytes=onnx_bytes, task=spec.task, params=params, metrics=metrics, history=result.history,
            tags={"request_id": row.request_id, "trigger": row.reason, "gate": decision,
                  "gate_failed": gate.summary()[:4000]}, lineage=lineage)
        timeline["registered"] = now_us()
        TRAINING_RUNS.labels(model=spec.name, outcome="trained").inc()
        row = self._move(row, "evaluating", {"decision": decision, "gate": gate.summary()[:2000]}, version=version,
                         run_id=run_id, checks=gate.failed)
        return self._decide(row, spec, timeline, metrics)

    def _decide(self, row: Stored, spec: ModelSpec, timeline: dict[str, int],
                metrics: dict[str, float] | None = None) -> ModelPromoted | ModelRejected:
        """Promote or reject the version registered for the request, as its gate decided."""
        if row.checks:
            return self._reject(row, row.checks)
        if metrics is None and row.run_id:
            metrics = client(self.s).get_run(row.run_id).data.metrics
        ev = promote(self.s, self.producer, spec.name, str(row.version), reason=f"{row.reason}: gate passed",
                     actor=CONTROLLER, metrics=metrics, request_id=row.request_id, timeline=timeline)
        TRAINING_RUNS.labels(model=spec.name, outcome="promoted").inc()
        self.last_promotion_us[spec.name] = ev.timeline["promoted"]
        row = self._move(row, "promoted", {"version": row.version})
        self._finished(row)
        return ev

    @staticmethod
    def _finished(row: Stored) -> None:
        RETRAIN_SECONDS.labels(model=row.model, outcome=row.state).observe(
            max(0.0, (row.updated_us - row.created_us) / 1e6))

    def _lineage(self, row: Stored, spec: ModelSpec, result: JobResult, gate: GateResult, champion: str | None,
                 champion_note: str, onnx_note: str) -> dict[str, Any]:
        """Everything behind a version: trigger, data, feature service, code, params, metrics, gate."""
        return {"request": row.request, "trigger": {"reason": row.reason, "evidence": row.request.get("evidence")},
                "data": row.data, "feature_service": spec.feature_service, "code": code_version(spec),
                "params": {"seed": SEED, "epochs": spec.epochs, "trainer": spec.trainer or f"builtin:{spec.task}",
                           "device": result.device, "resumed_from_epoch": result.resumed_from_epoch},
                "gate": {"passed": gate.passed, "failed": gate.failed, "metrics": gate.metrics,
                         "champion": champion, "champion_note": champion_note},
                "onnx": onnx_note}

    def _reject(self, row: Stored, checks: dict[str, str], outcome: str = "rejected", **values: Any) -> ModelRejected:
        TRAINING_RUNS.labels(model=row.model, outcome=outcome).inc()
        ev = ModelRejected(model_name=row.model, version=row.version, run_id=row.run_id, checks=checks,
                           request_id=row.request_id, outcome=outcome)  # type: ignore[arg-type]
        out = Deliveries(self.producer)
        out.event(self.s, "models.rejected", ev, row.model)
        out.wait()
        self._finished(self._move(row, outcome, {"checks": checks}, checks=checks, **values))
        log.warning("%s %s v%s: %s", outcome, row.model, row.version, checks)
        return ev

    # -- bootstrap ------------------------------------------------------------------------------------------

    def bootstrap_request(self, name: str) -> RetrainRequest | None:
        """A request for model ``name``'s first champion, once it has enough labels (and none is pending)."""
        spec = self.decls.model(name)
        if time.monotonic() < self.next_bootstrap.get(name, 0.0):
            return None
        self.next_bootstrap[name] = time.monotonic() + BOOTSTRAP_POLL_S
        try:
            champion = alias_version(self.s, name, CHAMPION)
        except Exception as e:  # noqa: BLE001 - the registry does not answer: asked again on the next poll
            REGISTRY.failed(e)
            raise RegistryDown from e
        REGISTRY.ok()
        if champion is not None or self.store.unfinished(name):
            return None  # it has a champion, or a request that may make one is under way
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
        """Bootstrap requests for every declared model that is due one (none while the registry is down: a
        locked store makes each read wait its busy timeout, so one failed read ends the round)."""
        out = []
        for name in self.decls.models:
            try:
                if (r := self.bootstrap_request(name)) is not None:
                    out.append(r)
            except RegistryDown:
                break
        return out

    def handled(self, req: RetrainRequest) -> None:
        """After a bootstrap request: if it did not produce a champion, try again later."""
        if req.reason == "bootstrap" and req.model_name in self.decls.models:
            self.next_bootstrap[req.model_name] = time.monotonic() + BOOTSTRAP_RETRY_S


class Dispatcher:
    """Runs the stored unfinished requests: requests of different models at once (up to
    ``retrain_concurrency``), one at a time per model, oldest first."""

    def __init__(self, ctl: Controller, stop: StopFlag, workers: int):
        self.ctl, self.stop = ctl, stop
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="retrain")
        self.busy: set[str] = set()
        self.lock = threading.Lock()

    def dispatch(self) -> None:
        for row in self.ctl.store.unfinished():
            with self.lock:
                if row.model in self.busy:
                    continue
                self.busy.add(row.model)
            self.pool.submit(self._handle, row)

    def _handle(self, row: Stored) -> None:
        req = row.as_request()
        try:
            if row.attempt or row.state != "requested":
                log.info("resuming %s request %s from state %s", row.model, row.request_id, row.state)
            self.ctl.handle(req, self.stop)
        except Exception:  # a bug in one request must not stop the others; it stays stored, retried later
            log.exception("%s request %s: unexpected error", row.model, row.request_id)
        finally:
            self.ctl.handled(req)
            with self.lock:
                self.busy.discard(row.model)

    def close(self) -> None:
        self.pool.shutdown(wait=not self.stop, cancel_futures=True)


def run(settings: Settings, launcher: Launcher | None = None) -> None:
    stop = StopFlag()
    watch = DeclarationsWatch(settings)
    consumer = make_consumer(settings, f"{settings.topic_prefix}retrain", ["retrain.requests"])
    ctl = Controller(settings, launcher or make_launcher(settings))
    log.info("retraining models %s", sorted(ctl.decls.models) or "none (nothing declared)")
    for name, spec in ctl.decls.models.items():  # every series exists from the start: increase() sees the first
        for outcome in ("promoted", "rejected", "failed", "refused"):
            TRAINING_RUNS.labels(model=name, outcome=outcome)
        TRAINING_BUDGET.labels(model=name).set(spec.train_budget_s or settings.train_budget_s or 0)
    mark_ready(settings, "retrain")
    runner = Dispatcher(ctl, stop, settings.retrain_concurrency)
    dead = DeadLetters(settings, "retrain", f"{settings.topic_prefix}retrain")
    restart = False
    try:
        while not stop and not restart:
            for msg in good_messages(consumer.consume(10, 0.5)):
                EVENTS_IN.labels(component="retrain", topic="retrain.requests").inc()
                try:
                    req = RetrainRequest.from_bytes(msg.value())
                except (ValidationError, ValueError, TypeError) as e:
                    dead.refused(msg, e)
                else:
                    if req.model_name in ctl.decls.models:
                        ctl.store.add(req)
                    else:
                        dead.add(msg, "unknown_model", f"model {req.model_name[:100]!r} is not declared "
                                                       f"(declared: {sorted(ctl.decls.models)})")
                dead.wait()
                commit_or_warn(consumer, "retrain", message=msg)  # stored durably: the store resumes it
            runner.dispatch()
            beat("retrain", progressed=True)
            restart = watch.changed()
            if not restart:
                ctl.bootstrap_requests()
    finally:
        consumer.close()
        runner.close()
        ctl.launcher.close()
    if restart:
        raise SystemExit(RESTART_EXIT)
