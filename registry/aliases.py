"""Moving the ``champion`` alias: promotion and rollback, recorded in the alias ledger and announced on
``models.promoted``. Aliases, never the deprecated stages."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from confluent_kafka import Producer

from driftloop.core.contracts import ModelPromoted
from driftloop.core.kafka import Deliveries
from driftloop.core.settings import Settings
from driftloop.registry.ledger import move_alias, moves
from driftloop.registry.versions import CHAMPION, alias_version

log = logging.getLogger(__name__)

ROLLBACK = "rollback"


def promote(settings: Settings, producer: Producer, name: str, version: str, *, reason: str,
            actor: str = "driftloop", metrics: Mapping[str, float] | None = None, request_id: str | None = None,
            timeline: dict[str, int] | None = None) -> ModelPromoted:
    """Move ``champion`` of model ``name`` to ``version`` (ledger first-class) and announce it."""
    move = move_alias(settings, name, CHAMPION, str(version), actor=actor, reason=reason, request_id=request_id)
    ev = ModelPromoted(model_name=name, version=str(version), previous_version=move.from_version,
                       run_id=move.run_id or "", metrics=dict(metrics or {}), reason=reason, request_id=request_id,
                       timeline={**(timeline or {}), "promoted": move.at_us})
    out = Deliveries(producer)  # the producer may be shared: wait for this record's ack only
    out.event(settings, "models.promoted", ev, name)
    out.wait()
    return ev


class RollbackError(Exception):
    """There is nothing to roll back to."""


def rollback_target(settings: Settings, name: str) -> tuple[str, str]:
    """(current champion, the version it replaced) from the ledger; a rollback's own move is skipped, so
    rolling back twice walks further back instead of toggling."""
    current = alias_version(settings, name, CHAMPION)
    if current is None:
        raise RollbackError(f"model {name!r} has no champion")
    for mv in reversed(moves(settings, name, CHAMPION)):
        if mv.to_version == current and not mv.reason.startswith(ROLLBACK):
            if mv.from_version is None:
                break
            return current, mv.from_version
    raise RollbackError(f"{name} v{current} replaced no earlier champion; name a version with --to")
