"""The alias ledger: an append-only record of every move of a model alias (MLflow keeps no history).

Every move — a promotion by the controller, a manual ``driftloop promote``, a rollback — goes through
:func:`move_alias`, which sets the MLflow alias and appends one row: model, alias, from, to, when,
who or what moved it, why, and the retrain request and run behind it. Moving an alias to where it
already points appends nothing, so a step replayed after a crash does not leave a duplicate.
"""

from __future__ import annotations

import getpass
import logging
import socket
from dataclasses import dataclass

from sqlalchemy import select

from driftloop.core.contracts import now_us
from driftloop.core.database import alias_moves, engine
from driftloop.core.settings import Settings
from driftloop.registry.versions import alias_version, client

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    model: str
    alias: str
    from_version: str | None
    to_version: str
    at_us: int
    actor: str
    reason: str
    request_id: str | None = None
    run_id: str | None = None


def cli_actor() -> str:
    """Who runs a command by hand: ``cli:<user>@<host>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


def moves(settings: Settings, model: str, alias: str | None = None) -> list[Move]:
    """Every recorded move of ``model``'s aliases (or of one alias), oldest first."""
    q = select(alias_moves).where(alias_moves.c.model == model)
    if alias is not None:
        q = q.where(alias_moves.c.alias == alias)
    with engine(settings).connect() as c:
        rows = c.execute(q.order_by(alias_moves.c.id)).mappings().all()
    return [Move(**{k: v for k, v in r.items() if k != "id"}) for r in rows]


def move_alias(settings: Settings, model: str, alias: str, version: str, *, actor: str, reason: str,
               request_id: str | None = None) -> Move:
    """Point ``model``'s ``alias`` at ``version`` and record the move (nothing new when it already points
    there and the ledger says so)."""
    c = client(settings)
    mv = c.get_model_version(model, version)  # raises for an unknown version
    current = alias_version(settings, model, alias)
    last = (moves(settings, model, alias) or [None])[-1]
    if current == str(version) and last is not None and last.to_version == str(version):
        return last
    c.set_registered_model_alias(model, alias, str(version))
    # already there but not recorded: a kill -9 came between the alias and the ledger; the move is from the
    # ledger's last version, so the chain has no gap
    frm = last.to_version if current == str(version) and last is not None else current
    move = Move(model, alias, frm, str(version), now_us(), actor, reason, request_id, mv.run_id)
    with engine(settings).begin() as conn:
        conn.execute(alias_moves.insert().values(**move.__dict__))
    log.info("%s: %s %s → v%s by %s: %s", model, alias, f"v{current}" if current else "(unset)", version, actor,
             reason)
    return move
