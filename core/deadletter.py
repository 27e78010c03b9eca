"""Dead letters of the workers' own consumers: a record a worker cannot use goes to ``dlq`` with its reason
(headers as the streams worker's: ``error``, ``reason``, ``source_topic``, ``partition``, ``offset``, plus
``consumer``), is counted in ``driftloop_dlq_total``, and is committed past only once the broker acknowledged
its dead letter. A value over ``MAX_VALUE`` bytes is cut to that length (header ``truncated``: its size), so a
record the broker took can always be dead-lettered, whatever its message size limit."""

from __future__ import annotations

import logging

import orjson
from confluent_kafka import Message
from pydantic import ValidationError

from driftloop.core.kafka import Deliveries, make_producer
from driftloop.core.metrics import DLQ
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

MAX_VALUE = 256 * 1024
MAX_DETAIL = 1000  # characters of the ``error`` header (a detail may quote the record)


def letter(value: bytes | None, headers: dict[str, str]) -> tuple[bytes | None, dict[str, str]]:
    """The dead letter's value and headers: the raw value cut to ``MAX_VALUE`` bytes, the error detail to
    ``MAX_DETAIL`` characters."""
    if len(headers.get("error", "")) > MAX_DETAIL:
        headers = {**headers, "error": headers["error"][:MAX_DETAIL]}
    if value is not None and len(value) > MAX_VALUE:
        return value[:MAX_VALUE], {**headers, "truncated": str(len(value))}
    return value, headers


def reason_of(e: Exception, raw: bytes | None) -> str:
    """The dead-letter reason of a record a contract could not parse: ``empty``, ``bad_json`` or ``invalid``."""
    if not raw:
        return "empty"
    if isinstance(e, orjson.JSONDecodeError) or (
            isinstance(e, ValidationError) and any(err["type"] == "json_invalid" for err in e.errors())):
        return "bad_json"
    return "invalid"


def detail_of(e: Exception) -> str:
    """One line naming what was wrong (pydantic's first error with its field)."""
    if isinstance(e, ValidationError) and e.errors():
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        return f"{where}: {err['msg']}"[:MAX_DETAIL]
    return str(e).splitlines()[0][:MAX_DETAIL] if str(e) else type(e).__name__


class DeadLetters:
    """One worker's dead letters: ``add`` per refused record, ``wait`` before committing past them."""

    def __init__(self, settings: Settings, component: str, consumer: str):
        self.topic = settings.topic("dlq")
        self.prefix = settings.topic_prefix
        self.component, self.consumer = component, consumer
        self.producer = make_producer(settings)
        self.batch = Deliveries(self.producer)
        self.logged: set[tuple[str, str]] = set()

    def add(self, msg: Message, reason: str, detail: str) -> None:
        topic, detail = msg.topic() or "", detail[:MAX_DETAIL]
        DLQ.labels(component=self.component, topic=topic.removeprefix(self.prefix), reason=reason).inc()
        first = (topic, reason) not in self.logged
        self.logged.add((topic, reason))
        log.log(logging.WARNING if first else logging.DEBUG, "dead-lettered %s[%s]@%s (%s): %s%s", topic,
                msg.partition(), msg.offset(), reason, detail, " (the next ones of this kind: debug log and "
                "driftloop_dlq_total)" if first else "")
        headers = {"error": detail, "reason": reason, "source_topic": topic, "partition": str(msg.partition()),
                   "offset": str(msg.offset()), "consumer": self.consumer}
        value, headers = letter(msg.value(), headers)
        self.batch.produce(self.topic, msg.key(), value, headers=headers)

    def refused(self, msg: Message, e: Exception) -> None:
        """Dead-letter a record its contract could not parse."""
        self.add(msg, reason_of(e, msg.value()), detail_of(e))

    def wait(self, timeout: float = 30.0) -> None:
        """Block until every dead letter added so far is acknowledged (DeliveryError if one was not)."""
        if self.batch.sent:
            self.batch.wait(timeout)
            self.batch = Deliveries(self.producer)
