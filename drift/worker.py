"""The drift worker (``driftloop worker drift``): the monitor's consumer loop and its alert webhook server.

One consumer reads ``predictions``, ``labels``, ``models.promoted`` and ``models.rejected`` and hands each
record to the :class:`~driftloop.drift.monitor.Monitor`; a record that does not parse, or names a model that is
not declared, goes to ``dlq`` (``core/deadletter.py``). Offsets are committed after every batch, up to the
first record an open window or label buffer still holds, so a restarted worker rebuilds its open windows.
The worker restarts (``RESTART_EXIT``) when new declarations are applied.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from driftloop.core.contracts import Label, ModelPromoted, ModelRejected, Prediction
from driftloop.core.deadletter import DeadLetters
from driftloop.core.kafka import LagReporter, commit_or_warn, good_messages, make_consumer
from driftloop.core.metrics import BATCH_SIZE, EVENTS_IN, beat
from driftloop.core.settings import Settings
from driftloop.core.worker import RESTART_EXIT, DeclarationsWatch, StopFlag, mark_ready
from driftloop.drift.auth import WebhookAuth, load_or_create_token
from driftloop.drift.monitor import TOPICS, Monitor
from driftloop.drift.page import loop_router
from driftloop.drift.webhook import create_app, start_server

log = logging.getLogger(__name__)


def commit_point(consumed: dict[tuple[str, int], int], held: dict[tuple[str, int], int]) -> list[TopicPartition]:
    """Offsets to commit: past every consumed record, except where a held record starts."""
    return [TopicPartition(t, p, held.get((t, p), last + 1)) for (t, p), last in consumed.items()]


PARSERS = {"predictions": Prediction, "labels": Label, "models.promoted": ModelPromoted,
           "models.rejected": ModelRejected}


def handle(mon: Monitor, msg: Message, kinds: dict[str, str], dead: DeadLetters) -> bool:
    """One record; whether it closed a window. Malformed records and undeclared models are dead-lettered."""
    kind = kinds.get(msg.topic(), "")
    try:
        rec = PARSERS[kind].from_bytes(msg.value())
    except (ValidationError, ValueError, KeyError, TypeError) as e:
        dead.refused(msg, e)
        return False
    if rec.model_name not in mon.states:
        dead.add(msg, "unknown_model",
                 f"model {rec.model_name[:100]!r} is not declared (declared: {sorted(mon.states)})")
        return False
    if isinstance(rec, Prediction):
        return mon.add(rec, msg) is not None
    if isinstance(rec, Label):
        mon.add_label(rec, msg)
    else:
        mon.on_outcome(rec)
    return False


def run(settings: Settings) -> None:
    stop = StopFlag()
    watch = DeclarationsWatch(settings)
    mon = Monitor(settings)
    log.info("monitoring models %s", sorted(mon.states) or "none (nothing declared)")
    auth = WebhookAuth(load_or_create_token(settings), settings.webhook_max_skew_s)
    app = create_app(mon, auth, rate_per_s=settings.webhook_rate_per_s, burst=settings.webhook_burst,
                     pages=loop_router(settings, mon))
    server = start_server(app, settings.webhook_host, settings.webhook_port)
    consumer = make_consumer(settings, f"{settings.topic_prefix}drift", TOPICS)
    kinds = {settings.topic(t): t for t in TOPICS}
    lag = LagReporter(consumer, "drift")
    mark_ready(settings, "drift")
    consumed: dict[tuple[str, int], int] = {}
    dead = DeadLetters(settings, "drift", f"{settings.topic_prefix}drift")
    restart = False
    try:
        while not stop and not restart:
            msgs = good_messages(consumer.consume(1000, 0.5))
            if msgs:
                BATCH_SIZE.labels(component="drift").observe(len(msgs))
            for msg in msgs:
                EVENTS_IN.labels(component="drift", topic=kinds.get(msg.topic(), msg.topic())).inc()
                handle(mon, msg, kinds, dead)
                consumed[(msg.topic(), msg.partition())] = msg.offset()
            if msgs:
                owned = {(tp.topic, tp.partition) for tp in consumer.assignment()}
                consumed = {tp: off for tp, off in consumed.items() if tp in owned}  # a rebalance moved the rest
                dead.wait()
                if consumed:
                    commit_or_warn(consumer, "drift", offsets=commit_point(consumed, mon.held()))
            beat("drift", progressed=bool(msgs))
            lag.maybe_report()
            restart = watch.changed()  # open windows are not committed: the restarted worker re-reads them
    finally:
        consumer.close()
        server.stop()
        mon.close()
    if restart:
        raise SystemExit(RESTART_EXIT)
