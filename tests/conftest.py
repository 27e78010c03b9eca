"""Shared fixtures: a real Kafka-protocol broker for the session and an isolated data dir per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

from driftloop.core.broker import EmbeddedBroker
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics

log = logging.getLogger(__name__)


def _docker_kafka() -> Iterator[str] | None:
    """testcontainers' Kafka when a Docker engine answers; None otherwise."""
    try:
        import docker
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    try:
        docker.from_env().ping()
    except Exception:  # no engine: the usual case on these machines
        return None

    def gen() -> Iterator[str]:
        with KafkaContainer() as k:
            yield k.get_bootstrap_server()

    return gen()


@pytest.fixture(scope="session")
def bootstrap_servers() -> Iterator[str]:
    if os.environ.get("DRIFTLOOP_TEST_BOOTSTRAP"):
        yield os.environ["DRIFTLOOP_TEST_BOOTSTRAP"]
        return
    docker_kafka = _docker_kafka()
    if docker_kafka is not None:
        yield from docker_kafka
        return
    with EmbeddedBroker() as b:
        yield b.bootstrap_servers


@pytest.fixture
def settings(tmp_path, bootstrap_servers) -> Settings:
    """Settings on the session broker with a topic prefix of its own, so tests never share topics."""
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers,
                 topic_prefix=f"t{uuid.uuid4().hex[:8]}.", partitions=2)
    ensure_topics(s)
    return s
