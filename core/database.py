"""driftloop's own state database (SQLAlchemy): retrain requests, the alias ledger and metered usage.

sqlite under the data directory by default (WAL, so workers and the CLI read while the controller
writes); any SQLAlchemy URL (e.g. PostgreSQL in the compose stack) with ``DRIFTLOOP_STATE_DB``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)

from driftloop.core.settings import Settings

metadata = MetaData()

# one row per retrain request: where it stands (core/requests.py)
requests = Table(
    "retrain_requests", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("model", String(200), nullable=False, index=True),
    Column("reason", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False, default=0),
    Column("not_before_us", BigInteger, nullable=False, default=0),  # retry backoff
    Column("request", JSON, nullable=False),  # the RetrainRequest as received
    Column("data", JSON),  # the training set: rows, split, Delta versions read
    Column("version", String(32)),
    Column("run_id", String(64)),
    Column("error", Text),
    Column("checks", JSON),  # the gate's failed checks
    Column("created_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)
# every state a request went through, append-only
transitions = Table(
    "retrain_transitions", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at_us", BigInteger, nullable=False),
    Column("detail", JSON),
)
# every move of a model alias, append-only (registry/ledger.py)
alias_moves = Table(
    "alias_moves", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False, index=True),
    Column("alias", String(64), nullable=False),
    Column("from_version", String(32)),
    Column("to_version", String(32), nullable=False),
    Column("at_us", BigInteger, nullable=False),
    Column("actor", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("request_id", String(64)),
    Column("run_id", String(64)),
)
# metered usage, appended by each worker every few seconds (core/usage.py)
usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(200), nullable=False, index=True),
    Column("kind", String(32), nullable=False),  # training_seconds, scoring_seconds, events, predictions
    Column("amount", Float, nullable=False),
    Column("at_us", BigInteger, nullable=False, index=True),
    Column("component", String(32), nullable=False),
)
for _table in ("alias_moves", "retrain_transitions"):  # sqlite refuses edits of the append-only tables
    for _op in ("UPDATE", "DELETE"):
        event.listen(metadata, "after_create", DDL(
            f"CREATE TRIGGER IF NOT EXISTS {_table}_no_{_op.lower()} BEFORE {_op} ON {_table} "
            f"BEGIN SELECT RAISE(ABORT, '{_table} is append-only'); END").execute_if(dialect="sqlite"))
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def engine(settings: Settings) -> Engine:
    """The engine of ``settings.state_url``, created once per URL, with every table created."""
    url = settings.state_url
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            eng = create_engine(url, future=True, pool_pre_ping=True)
            if eng.dialect.name == "sqlite":
                event.listen(eng, "connect", _sqlite_pragmas)
            metadata.create_all(eng)
            _engines[url] = eng
        return _engines[url]
