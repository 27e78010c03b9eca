"""The streaming inference worker: every declared model scores its topic's events → ``predictions``.

* One :class:`ModelServer` per declared model, each on a thread of its own (confluent-kafka, ONNX
  Runtime and sqlite release the GIL while they wait) with its own consumer group
  ``<prefix>serving.<model>`` on the model's scored topic, its own producer and its own slots. A batch
  (``serving_batch_size`` records or ``serving_linger_s``) is scored with one online-feature read and
  one model call.
* Offsets are committed only after the batch's predictions (and dead letters) are acknowledged by the
  broker: each batch tracks its own records' acks (``Deliveries``) on the model's producer, which the
  slots' loading threads share for ``models.rejected`` with trackers of their own; a crash re-scores at
  most the records after the last commit and never loses one, and one model's (or loading thread's)
  delivery failure never fails another's batch nor hides behind it.
* Events that fail their topic's schema go to ``dlq`` (headers as the streams worker's, plus
  ``consumer: serving.<model>``).
* Hot swap (``ModelSlot``): a ``models.promoted`` record naming the model (one control consumer for
  all models) or the alias poll (``serving_alias_poll_s``) starts a background load + verification;
  the verified version replaces one reference between batches.
* Shadow: with ``serving_shadow``, the model's ``challenger`` (when it is not the champion) scores the
  same vectors and its predictions go to ``predictions.shadow``.
* ``driftloop apply`` writing new declarations makes the worker finish its batches and exit with
  ``RESTART_EXIT``; the supervisor starts it on the new models.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Message

from driftloop.core.contracts import ModelRejected, Prediction
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.events import Invalid, parse
from driftloop.core.kafka import Deliveries, LagReporter, good_messages, make_consumer, make_producer
from driftloop.core.metrics import BATCH_SIZE, DLQ, EVENTS_IN, PREDICTION_LATENCY, beat, serve_metrics
from driftloop.core.settings import Settings
from driftloop.core.usage import UsageMeter, meter_scoring
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.features.repo import declarations, on_path, open_store
from driftloop.features.vectors import Vectorizer
from driftloop.registry.verify import Scorer
from driftloop.registry.versions import CHALLENGER, CHAMPION
from driftloop.serving.model_slot import ModelSlot

log = logging.getLogger(__name__)


def scores_of(task: str, out: np.ndarray) -> tuple[list[float], list[list[float]] | None]:
    """A scorer's outputs as prediction scores (and, multiclass, per-class probabilities): binary
    P(positive) clipped to [0, 1], regression the value, multiclass the index of the likeliest class."""
    if task == "multiclass":
        return np.argmax(out, axis=1).astype(np.float64).tolist(), out.tolist()
    if task == "binary":
        return np.clip(out, 0.0, 1.0).tolist(), None
    return out.tolist(), None


def prediction_records(spec: ModelSpec, scorer: Scorer, events: Sequence[dict[str, Any]], x: np.ndarray,
                       out: np.ndarray, now_s: float) -> list[tuple[bytes, bytes, float]]:
    """(key, ``Prediction`` JSON, latency) per event, serialised straight from the batch arrays."""
    scores, probs = scores_of(spec.task, out)
    rows = x.tolist()
    names = spec.features
    recs = []
    for i, ev in enumerate(events):
        key = str(ev[spec.key])
        latency = max(0.0, now_s - ev["ts"] / 1e6)
        value = orjson.dumps({"schema_version": Prediction.SCHEMA_VERSION, "event_id": ev["event_id"], "ts": ev["ts"],
                              "key": key, "model_name": spec.name, "model_version": scorer.version,
                              "score": scores[i], "probabilities": probs[i] if probs is not None else None,
                              "features": dict(zip(names, rows[i], strict=True)), "latency_s": latency})
        recs.append((key.encode(), value, latency))
    return recs


class ModelServer:
    """Scores one model's topic: consumer group, producer, champion (and challenger) slots of its own."""

    def __init__(self, settings: Settings, decls: Declarations, spec: ModelSpec, halt: threading.Event,
                 meter: UsageMeter | None = None):
        self.s = settings
        self.meter = meter or UsageMeter(settings, "serving")
        self.spec = spec
        self.schema = decls.topics[spec.topic]
        self.halt = halt
        self.name = f"serving.{spec.name}"
        self.vectorizer = Vectorizer(open_store(settings), spec)
        self.producer = make_producer(settings)  # shared with the loading threads: each batch tracks its acks
        self.champion = ModelSlot(settings, spec, CHAMPION, self._on_reject(CHAMPION))
        self.challenger = ModelSlot(settings, spec, CHALLENGER, self._on_reject(CHALLENGER)) \
            if settings.serving_shadow else None
        self.slots = [s for s in (self.champion, self.challenger) if s is not None]
        self.topics = {t: settings.topic(t) for t in ("predictions", "predictions.shadow", "dlq")}
        self.consumer = make_consumer(settings, f"{settings.topic_prefix}{self.name}", [spec.topic])
        self.lag = LagReporter(self.consumer, "serving")
        self.refresh_requested = threading.Event()
        self.error: BaseException | None = None
        self._unscored_logged = 0.0
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _on_reject(self, alias: str) -> Any:
        def hook(version: str, check: str, why: str) -> None:
            ev = ModelRejected(model_name=self.spec.name, version=version, run_id=None,
                               checks={f"serving_verification.{check}": why, "alias": alias})
            announce = Deliveries(self.producer)
            announce.event(self.s, "models.rejected", ev, self.spec.name)
            announce.wait()
        return hook

    def load(self) -> list[threading.Thread]:
        """Start loading every slot's version (the loading threads)."""
        return [slot.refresh() for slot in self.slots]

    def start(self) -> None:
        for slot in self.slots:
            slot.swap_if_ready()
        self.thread.start()

    def _run(self) -> None:
        s, consumer = self.s, self.consumer
        next_poll = time.monotonic() + s.serving_alias_poll_s
        try:
            while not self.halt.is_set():
                msgs = good_messages(consumer.consume(s.serving_batch_size, s.serving_linger_s))
                if self.refresh_requested.is_set() or time.monotonic() >= next_poll:
                    self.refresh_requested.clear()
                    next_poll = time.monotonic() + s.serving_alias_poll_s
                    for slot in self.slots:
                        slot.refresh()
                for slot in self.slots:
                    slot.swap_if_ready()
                if msgs:
                    self.score_batch(msgs)
                    consumer.commit(asynchronous=False)
                beat("serving", progressed=bool(msgs))
                self.lag.maybe_report()
        except BaseException as e:  # the main thread stops the worker; the uncommitted batch is re-scored
            log.exception("%s failed", self.name)
            self.error = e
        finally:
            consumer.close()

    def score_batch(self, msgs: list[Message]) -> int:
        """Score one batch with the champion (and challenger), dead-letter invalid events, publish, and wait
        for the broker's acks; returns the number of predictions."""
        spec, cpu0 = self.spec, time.thread_time()
        BATCH_SIZE.labels(component="serving").observe(len(msgs))
        EVENTS_IN.labels(component="serving", topic=spec.topic).inc(len(msgs))
        batch = Deliveries(self.producer)
        events = []
        for m in msgs:
            try:
                events.append(parse(m.value(), self.schema))
            except Invalid as e:
                self.dead_letter(batch, m, e)
        model, shadow = self.champion.current, self.challenger.current if self.challenger else None
        recs: list[tuple[bytes, bytes, float]] = []
        if model is not None and events:
            t0 = time.perf_counter()
            x = self.vectorizer.matrix(events)
            t1 = time.perf_counter()
            recs = prediction_records(spec, model, events, x, model.score(x), time.time())
            for key, value, _lat in recs:
                batch.produce(self.topics["predictions"], key, value)
            if shadow is not None and shadow.version != model.version:
                for key, value, _lat in prediction_records(spec, shadow, events, x, shadow.score(x), time.time()):
                    batch.produce(self.topics["predictions.shadow"], key, value)
            log.debug("%s: batch of %d: features %.3fs, score+publish %.3fs", self.name, len(events), t1 - t0,
                      time.perf_counter() - t1)
        elif events and time.monotonic() - self._unscored_logged > 30:
            self._unscored_logged = time.monotonic()
            log.warning("%s: no champion yet; events pass unscored", self.name)
        batch.wait()
        meter_scoring(self.meter, spec.name, model.version if model is not None else "", len(msgs), len(recs),
                      time.thread_time() - cpu0)
        if recs and model is not None:
            latency = PREDICTION_LATENCY.labels(model=spec.name)
            for _k, _v, lat in recs:
                latency.observe(lat)
        return len(recs)

    def dead_letter(self, batch: Deliveries, m: Message, e: Invalid) -> None:
        DLQ.labels(component="serving", topic=self.spec.topic, reason=e.reason).inc()
        headers = {"error": e.detail, "reason": e.reason, "source_topic": m.topic(), "partition": str(m.partition()),
                   "offset": str(m.offset()), "consumer": self.name}
        batch.produce(self.topics["dlq"], m.key(), m.value(), headers=headers)


def _promoted_model(m: Message) -> str | None:
    """The model a ``models.promoted`` record names (None when it cannot be read)."""
    try:
        return str(orjson.loads(m.value())["model_name"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return m.key().decode(errors="replace") if m.key() else None


def run(settings: Settings) -> int:
    """Serve every declared model until SIGTERM (0) or new declarations (``RESTART_EXIT``)."""
    stop = StopFlag()
    watch = DeclarationsWatch(settings)  # before reading them, so a change in between is not missed
    decls = declarations(settings)
    on_path(settings.feature_repo_dir)  # a version without an ONNX copy unpickles the repo's trainer module
    halt, meter = threading.Event(), UsageMeter(settings, "serving")
    serve_metrics(settings.metrics_port, "serving", settings.metrics_host)
    servers = {name: ModelServer(settings, decls, spec, halt, meter) for name, spec in decls.models.items()}
    if not servers:
        log.warning("no models declared: waiting for driftloop apply")
    control = make_consumer(settings, f"{settings.topic_prefix}serving-ctl-{uuid.uuid4().hex[:8]}",
                            ["models.promoted"], **{"auto.offset.reset": "latest"})
    for t in [t for srv in servers.values() for t in srv.load()]:
        t.join()
    for srv in servers.values():
        srv.start()
    mark_ready(settings, "serving")
    log.info("serving %s", ", ".join(f"{n} ({s.spec.topic})" for n, s in servers.items()) or "no models")
    code = 0
    try:
        while not stop:
            failed = next((srv for srv in servers.values() if not srv.thread.is_alive()), None)
            if failed is not None:
                raise RuntimeError(f"{failed.name} stopped: {failed.error!r}") from failed.error
            if watch.changed():
                code = RESTART_EXIT
                break
            for m in good_messages(control.consume(100, 0.2)):
                name = _promoted_model(m)
                targets = list(servers.values()) if name is None else [servers[name]] if name in servers else []
                for srv in targets:
                    srv.refresh_requested.set()
    finally:
        halt.set()
        for srv in servers.values():
            if srv.thread.is_alive():
                srv.thread.join()
        control.close()
        meter.close()
    return code
