"""Idempotent topic creation with explicit partition counts (Tansu does not auto-create well)."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from driftloop.core.contracts import TOPICS
from driftloop.core.declarations import Declarations
from driftloop.core.kafka import bootstrap
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


def default_topics(settings: Settings) -> list[str]:
    """driftloop's own topics and every declared event topic (once ``driftloop apply`` ran)."""
    declared = Declarations.load(settings.declarations_file).topics
    return [*TOPICS, *sorted(t for t in declared if t not in TOPICS)]


def check_label_partitions(settings: Settings, partitions: dict[str, int]) -> None:
    """Each model's label topic must have as many partitions as its scored topic: the label join runs in
    the scored entity's state, so an outcome must land in the partition of the event it labels.
    ``partitions``: full topic name → partition count (topics not there are not checked)."""
    for m in Declarations.load(settings.declarations_file).models.values():
        scored, label = settings.topic(m.topic), settings.topic(m.label.topic)
        if scored in partitions and label in partitions and partitions[scored] != partitions[label]:
            raise ValueError(f"model {m.name}: label topic {label} has {partitions[label]} partitions but scored "
                             f"topic {scored} has {partitions[scored]}; they must be equal")


def ensure_topics(settings: Settings, names: list[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Create each logical topic that does not exist yet (default: ``default_topics``); return the full
    names that were created. Raises ValueError when a model's scored and label topics differ in
    partition count."""
    admin = AdminClient({"bootstrap.servers": bootstrap(settings)})
    wanted = [settings.topic(n) for n in (names or default_topics(settings))]
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [t for t in wanted if t not in existing]
    created = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing],
            operation_timeout=timeout,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(timeout=timeout).topics
        if all(t in meta and meta[t].partitions for t in wanted):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"topics not visible after {timeout}s: {wanted}")
    if created:
        log.info("created topics %s", created)
    check_label_partitions(settings, {name: len(t.partitions) for name, t in meta.items()})
    return created
