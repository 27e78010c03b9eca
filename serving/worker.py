"""The streaming inference worker: every declared model scores its topic's events → ``predictions``.

* One :class:`ModelServer` per declared model, each on a thread of its own (confluent-kafka, ONNX
  Runtime and sqlite release the GIL while they wait) with its own consumer group
  ``<prefix>serving.<model>`` on the model's scored topic, its own producer and its own slots. A batch
  (what the consumer holds once a record arrives, at most ``serving_batch_size``; ``serving_linger_s`` is
  the longest wait for that record) is scored with one online-feature read and one model call.
* Offsets are committed only after the batch's predictions (and dead letters) are acknowledged by the
  broker. Each model's scoring thread has a producer of its own that reports failed records only (no Python
  call per acknowledged record): a flush there covers that thread's records alone, and a failure stops the
  worker uncommitted. The slots' loading threads announce ``models.rejected`` on another producer, each
  record tracked (``Deliveries``), so their failures never fail a batch nor hide behind one. A crash
  re-scores at most the records after the last commit and never loses one.
* Batches are pipelined: batch N+1 is fetched, scored and serialised while N's records travel; then N is
  acknowledged and committed (its own offsets; the loop does not wait for the broker's answer, a failure
  raises on a later poll), and N+1 is produced. A rebalance commits the batch in flight before its
  partitions go (``on_revoke``) and waits for the answer, as the close does.
* Events that fail their topic's schema go to ``dlq`` (headers as the streams worker's, plus
  ``consumer: serving.<model>``).
* Hot swap (``ModelSlot``): a ``models.promoted`` record naming the model (one control consumer for
  all models) or the alias poll (``serving_alias_poll_s``) starts a background load + verification;
  the verified version replaces one reference between batches.
* Shadow: with ``serving_shadow``, the model's ``challenger`` (when it is not the champion) scores the
  same vectors and its predictions go to ``predictions.shadow``.
* Speed: a batch is parsed in one comprehension (``parse_many``), read online and scored as arrays, and its
  predictions encoded from msgspec structs shaped like ``Prediction`` (``prediction_batch``: no dict per record);
  its latencies go to the histogram in one update per bucket (``observe_many``).
  Objects alive once started are frozen out of the garbage collector (``gc.freeze``): a full collection
  over everything Feast, MLflow and ONNX Runtime loaded stalled a batch for ~0.6 s.
* ``driftloop apply`` writing new declarations makes the worker finish its batches and exit with
  ``RESTART_EXIT``; the supervisor starts it on the new models.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from driftloop.core.contracts import ModelRejected, Prediction
from driftloop.core.deadletter import letter
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.events import Invalid, parse_many
from driftloop.core.kafka import (
    CommitErrors,
    Deliveries,
    LagReporter,
    commit_or_warn,
    flush_or_raise,
    good_messages,
    make_consumer,
    make_producer,
    produce_all,
)
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
_ENCODER = msgspec.json.Encoder()


def scores_of(task: str, out: np.ndarray) -> tuple[list[float], list[list[float]] | None]:
    """A scorer's outputs as prediction scores (and, multiclass, per-class probabilities): binary
    P(positive) clipped to [0, 1], regression the value, multiclass the index of the likeliest class."""
    if task == "multiclass":
        return np.argmax(out, axis=1).astype(np.float64).tolist(), out.tolist()
    if task == "binary":
        return np.clip(out, 0.0, 1.0).tolist(), None
    return out.tolist(), None


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, as one update per bucket (prometheus_client's per-value
    ``observe`` costs microseconds each); falls back to ``observe`` on a client without these internals."""
    bounds, buckets, total = (getattr(histogram, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for v in values.tolist():
            histogram.observe(v)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds), values, side="left"), minlength=len(bounds) + 1)
    for bucket, n in zip(buckets, counts.tolist(), strict=False):  # the last count: NaN, in no bucket
        if n:
            bucket.inc(n)
    total.inc(float(values.sum()))


@functools.lru_cache(maxsize=64)
def _prediction_types(features: tuple[str, ...]) -> tuple[type[msgspec.Struct], type[msgspec.Struct]]:
    """msgspec structs that encode as ``Prediction``'s JSON (same keys, same order) for a model's features, and
    as its ``features`` (any names, through ``rename``): no dict is built per record."""
    feats = msgspec.defstruct("Features", [(f"f{i}", float) for i in range(len(features))],
                              rename={f"f{i}": name for i, name in enumerate(features)})
    return msgspec.defstruct("PredictionRecord", [
        ("schema_version", int), ("event_id", str), ("ts", int), ("key", str), ("model_name", str),
        ("model_version", str), ("score", float), ("probabilities", list[float] | None), ("features", feats),
        ("latency_s", float)]), feats


def prediction_batch(spec: ModelSpec, scorer: Scorer, events: Sequence[dict[str, Any]], x: np.ndarray,
                     out: np.ndarray, now_s: float) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """Keys, ``Prediction`` JSON values and latencies (s) of a batch, serialised straight from its arrays."""
    scores, probs = scores_of(spec.task, out)
    ts = np.fromiter((ev["ts"] for ev in events), np.float64, len(events))  # float(ts), as Python's ts / 1e6
    latency = np.maximum(now_s - ts / 1e6, 0.0)
    keys = [str(ev[spec.key]) for ev in events]
    record, feats = _prediction_types(tuple(spec.features))
    encode, schema, model, version = _ENCODER.encode, Prediction.SCHEMA_VERSION, spec.name, scorer.version
    values = [encode(record(schema, ev["event_id"], ev["ts"], key, model, version, score, p, feats(*row), lat))
              for ev, key, score, p, row, lat in zip(events, keys, scores, probs or [None] * len(keys), x.tolist(),
                                                     latency.tolist(), strict=True)]
    return [k.encode() for k in keys], values, latency


def prediction_records(spec: ModelSpec, scorer: Scorer, events: Sequence[dict[str, Any]], x: np.ndarray,
                       out: np.ndarray, now_s: float) -> list[tuple[bytes, bytes, float]]:
    """(key, ``Prediction`` JSON, latency) per event (:func:`prediction_batch` as records)."""
    keys, values, latency = prediction_batch(spec, scorer, events, x, out, now_s)
    return list(zip(keys, values, latency.tolist(), strict=True))


Out = tuple[str, bytes | None, bytes | None, dict[str, str] | None]  # topic, key, value, headers


@dataclass
class Batch:
    """One batch, scored and serialised, not produced yet; committed once the broker acknowledged it."""

    offsets: list[TopicPartition]  # each partition's last offset + 1
    records: list[Out] = field(default_factory=list)
    scored: int = 0
    latency: np.ndarray = field(default_factory=lambda: np.empty(0))


def next_offsets(msgs: list[Message]) -> list[TopicPartition]:
    """The offsets to commit once ``msgs`` are done: each partition's last offset + 1."""
    last: dict[tuple[str, int], int] = {}
    for m in msgs:
        last[(m.topic(), m.partition())] = m.offset()
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


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
        # the scoring thread's own producer: it reports failed records only (no Python call per ack), and a
        # flush there waits for that thread's records alone; the loading threads announce on another
        self.producer = make_producer(settings, **{"delivery.report.only.error": True})
        self.announcer = make_producer(settings)
        self.champion = ModelSlot(settings, spec, CHAMPION, self._on_reject(CHAMPION))
        self.challenger = ModelSlot(settings, spec, CHALLENGER, self._on_reject(CHALLENGER)) \
            if settings.serving_shadow else None
        self.slots = [s for s in (self.champion, self.challenger) if s is not None]
        self.topics = {t: settings.topic(t) for t in ("predictions", "predictions.shadow", "dlq")}
        self.commits = CommitErrors(self.name)
        self.consumer = make_consumer(settings, f"{settings.topic_prefix}{self.name}", [spec.topic],
                                      on_revoke=self._revoked, on_commit=self.commits)
        self.in_flight: Batch | None = None  # produced, not yet acknowledged nor committed
        self.unanswered: list[TopicPartition] | None = None  # the last offsets committed without waiting
        self.lag = LagReporter(self.consumer, "serving")
        self.refresh_requested = threading.Event()
        self.error: BaseException | None = None
        self._unscored_logged = 0.0
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def _on_reject(self, alias: str) -> Any:
        def hook(version: str, check: str, why: str) -> None:
            ev = ModelRejected(model_name=self.spec.name, version=version, run_id=None,
                               checks={f"serving_verification.{check}": why, "alias": alias})
            announce = Deliveries(self.announcer)
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
        s = self.s
        next_poll = time.monotonic() + s.serving_alias_poll_s
        failed = False
        try:
            while not self.halt.is_set():
                msgs = self._next_batch()  # a rebalance in here settles the batch in flight first (_revoked)
                if self.refresh_requested.is_set() or time.monotonic() >= next_poll:
                    self.refresh_requested.clear()
                    next_poll = time.monotonic() + s.serving_alias_poll_s
                    for slot in self.slots:
                        slot.refresh()
                for slot in self.slots:
                    slot.swap_if_ready()
                self.commits.check()  # a commit that failed (answered during the poll) stops the worker
                batch = self.score_batch(msgs) if msgs else None
                self._settle(wait=False)  # the previous batch: its acks travelled while this one was scored
                if batch is not None:
                    self._produce(batch)
                    self.in_flight = batch
                beat("serving", progressed=bool(msgs))
                self.lag.maybe_report()
        except BaseException as e:  # the main thread stops the worker; the uncommitted batches are re-scored
            failed, self.in_flight = True, None  # closing must not commit it (the revoke callback)
            log.exception("%s failed", self.name)
            self.error = e
        finally:
            try:
                if not failed:
                    self._settle()
            finally:
                self.consumer.close()

    def _revoked(self, _consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        """Before a rebalance takes partitions away: the batch in flight is acknowledged and committed, so
        their next owner starts after it (a failed record stops the worker: nothing past it is committed; a
        commit the group refuses, having moved on without this member, means the batch is scored again)."""
        self._settle()

    def _settle(self, wait: bool = True) -> None:
        """Wait for the acks of the batch in flight (the only records on the producer), then commit its offsets:
        never before, so nothing is lost; a failed record raises and stops the worker, uncommitted. The scoring
        loop commits without waiting for the broker's answer (``wait=False``: a failure is reported by a later
        poll, ``CommitErrors``); a rebalance and the close wait for it, and so for every commit before it (the
        coordinator answers them in order), so the partitions' next owner starts after every settled batch."""
        batch, self.in_flight = self.in_flight, None
        t0 = t1 = time.perf_counter()
        if batch is not None:
            flush_or_raise(self.producer)
            t1 = time.perf_counter()
            if not wait:
                self.consumer.commit(offsets=batch.offsets, asynchronous=True)
                self.unanswered = batch.offsets
        if wait:
            offsets = batch.offsets if batch is not None else self.unanswered
            if offsets:  # refused: re-scored (at least once)
                commit_or_warn(self.consumer, self.name, offsets=offsets)
            self.unanswered = None
        if batch is not None:
            log.debug("%s: batch of %d settled: acks %.3fs, commit %.3fs", self.name, len(batch.records), t1 - t0,
                      time.perf_counter() - t1)
            if batch.scored:
                observe_many(PREDICTION_LATENCY.labels(model=self.spec.name), batch.latency)

    def _next_batch(self) -> list[Message]:
        """The records the consumer holds once one arrives (waiting up to ``serving_linger_s`` for it), at most
        ``serving_batch_size``: no record waits for a batch to fill, and a backlog is taken in full batches."""
        first = self.consumer.poll(self.s.serving_linger_s)
        if first is None:
            return []
        more = self.consumer.consume(self.s.serving_batch_size - 1, 0) if self.s.serving_batch_size > 1 else []
        return good_messages([first, *more])

    def score_batch(self, msgs: list[Message]) -> Batch:
        """Score one batch with the champion (and challenger) and serialise its predictions and dead letters
        (produced by ``_produce``; committed by ``_settle`` once acknowledged)."""
        spec, cpu0 = self.spec, time.thread_time()
        BATCH_SIZE.labels(component="serving").observe(len(msgs))
        EVENTS_IN.labels(component="serving", topic=spec.topic).inc(len(msgs))
        batch = Batch(next_offsets(msgs))
        events = []
        for m, row in zip(msgs, parse_many([m.value() for m in msgs], self.schema), strict=True):
            if isinstance(row, Invalid):
                batch.records.append(self.dead_letter(m, row))
            else:
                events.append(row)
        model, shadow = self.champion.current, self.challenger.current if self.challenger else None
        if model is not None and events:
            t0 = time.perf_counter()
            x = self.vectorizer.matrix(events)
            t1 = time.perf_counter()
            keys, values, batch.latency = prediction_batch(spec, model, events, x, model.score(x), time.time())
            topic = self.topics["predictions"]
            batch.records += [(topic, k, v, None) for k, v in zip(keys, values, strict=True)]
            if shadow is not None and shadow.version != model.version:
                topic = self.topics["predictions.shadow"]
                keys, values, _ = prediction_batch(spec, shadow, events, x, shadow.score(x), time.time())
                batch.records += [(topic, k, v, None) for k, v in zip(keys, values, strict=True)]
            batch.scored = len(events)
            log.debug("%s: batch of %d: features %.3fs, score+serialise %.3fs", self.name, len(events), t1 - t0,
                      time.perf_counter() - t1)
        elif events and time.monotonic() - self._unscored_logged > 30:
            self._unscored_logged = time.monotonic()
            log.warning("%s: no champion yet; events pass unscored", self.name)
        meter_scoring(self.meter, spec.name, model.version if model is not None else "", len(msgs), batch.scored,
                      time.thread_time() - cpu0)
        return batch

    def _produce(self, batch: Batch) -> None:
        produce_all(self.producer, batch.records)

    def dead_letter(self, m: Message, e: Invalid) -> Out:
        """The dead letter of an invalid event: (topic, key, value, headers)."""
        DLQ.labels(component="serving", topic=self.spec.topic, reason=e.reason).inc()
        headers = {"error": e.detail, "reason": e.reason, "source_topic": m.topic(), "partition": str(m.partition()),
                   "offset": str(m.offset()), "consumer": self.name}
        value, out = letter(m.value(), headers)
        return self.topics["dlq"], m.key(), value, out


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
    gc.freeze()  # full collections skip what start-up loaded (a cyclic first version is kept after a swap)
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
        gc.unfreeze()  # collectable again at exit (native extensions otherwise report leaks)
    return code
