"""Moving the ``champion`` alias: promotion and rollback, both announced on ``models.promoted``.

Promotion records the version it replaced (version tag ``previous_champion``, which ``rollback``
follows); aliases, never the deprecated stages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from confluent_kafka import Producer
from mlflow.exceptions import MlflowException

from driftloop.core.contracts import ModelPromoted, now_us
from driftloop.core.kafka import Deliveries
from driftloop.core.settings import Settings
from driftloop.registry.versions import CHAMPION, PREVIOUS_TAG, alias_version, client

log = logging.getLogger(__name__)


def promote(settings: Settings, producer: Producer, name: str, version: str, *, reason: str,
            metrics: Mapping[str, float] | None = None, request_id: str | None = None,
            timeline: dict[str, int] | None = None, record_previous: bool = True) -> ModelPromoted:
    """Move ``champion`` of model ``name`` to ``version`` and announce it on ``models.promoted``."""
    c = client(settings)
    mv = c.get_model_version(name, version)  # raises for an unknown version
    previous = alias_version(settings, name, CHAMPION)
    if record_previous and previous is not None and previous != str(version):
        c.set_model_version_tag(name, str(version), PREVIOUS_TAG, previous)
    c.set_registered_model_alias(name, CHAMPION, str(version))
    timeline = {**(timeline or {}), "promoted": now_us()}
    ev = ModelPromoted(model_name=name, version=str(version), previous_version=previous, run_id=mv.run_id,
                       metrics=dict(metrics or {}), reason=reason, request_id=request_id, timeline=timeline)
    out = Deliveries(producer)  # the producer may be shared: wait for this record's ack only
    out.event(settings, "models.promoted", ev, name)
    out.wait()
    log.info("champion %s v%s (was %s): %s", name, version, previous, reason)
    return ev


class RollbackError(Exception):
    """There is nothing to roll back to."""


def rollback(settings: Settings, producer: Producer, name: str, to: str | None = None) -> ModelPromoted:
    """Move ``champion`` back to the version it replaced (or to ``to``) and announce it."""
    current = alias_version(settings, name, CHAMPION)
    if current is None:
        raise RollbackError(f"model {name!r} has no champion")
    target = to or (client(settings).get_model_version(name, current).tags or {}).get(PREVIOUS_TAG)
    if target is None:
        raise RollbackError(f"{name} v{current} replaced no earlier champion; name a version with --to")
    if str(target) == current:
        raise RollbackError(f"{name} v{current} is already the champion")
    try:
        return promote(settings, producer, name, str(target), reason="rollback", record_previous=False)
    except MlflowException as e:
        raise RollbackError(f"{name} has no version {target}: {e.message}") from e
