"""Idempotent topic creation with explicit partition counts (Tansu does not auto-create well)."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from driftloop.core.contracts import TOPICS
from driftloop.core.kafka import bootstrap
from driftloop.core.settings import Settings

log = logging.getLogger(__name__)


def ensure_topics(settings: Settings, names: list[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Create each logical topic that does not exist yet; return the full names that were created."""
    admin = AdminClient({"bootstrap.servers": bootstrap(settings)})
    wanted = [settings.topic(n) for n in (names or list(TOPICS))]
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
        if set(wanted) <= set(admin.list_topics(timeout=timeout).topics):
            break
        time.sleep(0.1)
    else:
        raise TimeoutError(f"topics not visible after {timeout}s: {wanted}")
    if created:
        log.info("created topics %s", created)
    return created
