"""driftloop's Feast online stores: sqlite (the default) and Redis, selected in ``feature_store.yaml``::

    online_store:
      type: driftloop.features.online_stores.MonotonicSqliteOnlineStore
      path: /data/online.db

    online_store:
      type: driftloop.features.online_stores.MonotonicRedisOnlineStore
      connection_string: "localhost:6379,db=0"

**Writes are monotonic**: a row replaces the stored row of its (view, entity) only when its
``(event_ts, created_ts)`` pair is newer or equal (compared as a pair; a row without a created time ranks
below every created time). The comparison and the write are one SQL statement (sqlite ``INSERT ... ON
CONFLICT DO UPDATE ... WHERE``) or one Lua script (Redis), so no writer can slip in between. Hence:

* the stream's late-event correction (same event time, later created) replaces the stored value;
* rows recomputed from the offline tables are written *without* a created time (``feast materialize``
  through ``features/materialize.py``, ``driftloop backfill --materialize``): they fill an empty entity
  or replace an older value, but never a newer one, nor the stream's value at the same event time (that
  value covers every event consumed so far; an offline row only those consumed up to its own event).

**Layout** (driftloop's own): one record per (view, entity) with the feature names, the values as Feast
``Value`` protos (what ``online_read`` returns to Feast) and the numeric values as float64 (what
``read_matrix`` returns to serving, with no proto decoding). sqlite: one table ``driftloop_online`` keyed
by (project, view, entity key), in WAL mode so readers never wait for the writer; a batched read of many
views and entities is one ``SELECT``. Redis (a single server; no cluster): one hash per entity,
``dl:<project>:<entity key>``, with fields ``t:|c:|n:|v:|f:<view>``; a batched read is one pipeline of one
``HMGET`` per entity.
"""

from __future__ import annotations

import itertools
import json
import operator
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from feast import Entity, FeatureView, RepoConfig
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_versioned_name
from feast.infra.online_stores.online_store import OnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import RepeatedValue, Value
from feast.repo_config import FeastConfigBaseModel
from feast.value_type import ValueType
from pydantic import StrictStr

from driftloop.features.value_encoding import encode_rows, encode_values, proto_values

Row = tuple[EntityKey, dict[str, Value], datetime, datetime | None]  # a row as Feast hands it to a store
Fetched = tuple[str, bytes, int, str, bytes]  # view, entity key, event time µs, feature names, values blob
_VIEW_NAMES = operator.itemgetter(0, 3)  # a fetched row's view and feature names
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NO_CREATED = -1  # the created time of a row written without one: below every real created time
SEP = "\x1f"  # between feature names
KEY_CACHE = 500_000  # serialised entity keys remembered by ``write_columns``


def key_bytes(config: RepoConfig, entity_key: EntityKey) -> bytes:
    """An entity key as the stores key it (Feast's stable serialisation), for ``read_matrix``."""
    return serialize_entity_key(entity_key, entity_key_serialization_version=config.entity_key_serialization_version)


def to_us(ts: datetime) -> int:
    """Epoch microseconds of a datetime (naive = UTC, as Feast assumes)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(us))


def feast_rows(view: FeatureView, columns: Mapping[str, Sequence[Any]], event_us: Sequence[int],
               created_us: Sequence[int] | None) -> list[Row]:
    """Rows in Feast's online form from columns of python values (entity columns and every feature of
    ``view``; None or NaN = null) and times in µs (``created_us`` None: rows without a created time)."""
    joins = [(c.name, c.dtype.to_value_type()) for c in view.entity_columns]
    names = [k for k, _ in joins]
    keys = [EntityKey(join_keys=names, entity_values=vs) for vs in
            zip(*(proto_values(columns[k], vt) for k, vt in joins), strict=True)]
    feats = {f.name: proto_values(columns[f.name], f.dtype.to_value_type()) for f in view.features}
    values = [dict(zip(feats, vs, strict=True)) for vs in zip(*feats.values(), strict=True)] if feats \
        else [{} for _ in keys]
    created = [None] * len(keys) if created_us is None else [from_us(c) for c in created_us]
    return list(zip(keys, values, [from_us(t) for t in event_us], created, strict=True))


def _view_name(config: RepoConfig, view: FeatureView) -> str:
    return compute_versioned_name(view, getattr(config.registry, "enable_online_feature_view_versioning", False))


def _encode(values: dict[str, Value]) -> tuple[str, bytes, bytes]:
    """Feature names, the values as a ``RepeatedValue``, the numeric values as little-endian float64."""
    return (SEP.join(values), *encode_values(list(values.values())))


class MonotonicOnlineStore(OnlineStore):
    """Feast's online store interface over a store's conditional upsert and batched fetch.

    Public beyond Feast's interface: ``write`` (``online_write_batch`` that says which rows it stored) and
    ``read_matrix`` (numeric values of many views for many entities in one round trip)."""

    def __init__(self) -> None:
        self._plans: dict[tuple[str, tuple[str, ...], int], tuple[list[int], np.ndarray]] = {}
        self._keys: dict[tuple[Any, ...], dict[Any, bytes]] = {}  # signature → values → key bytes

    # -- what a store implements ------------------------------------------------------------------
    def _upsert(self, config: RepoConfig, view: str, rows: list[tuple[bytes, int, int, str, bytes, bytes]]
                ) -> set[bytes]:
        """Store each (key, event µs, created µs, names, values, nums) unless its stored (event, created) is
        newer, atomically per row; return the keys stored. Keys are distinct."""
        raise NotImplementedError

    def _fetch(self, config: RepoConfig, views: list[str], keys: Sequence[bytes], what: Literal["vals", "nums"]
               ) -> Iterable[Fetched]:
        """The stored records of ``views`` × ``keys`` (those that exist), with the values (``vals``) or the
        numbers (``nums``)."""
        raise NotImplementedError

    def _delete(self, config: RepoConfig, views: Sequence[FeatureView]) -> None:
        """Drop every stored row of ``views``."""
        raise NotImplementedError

    def update(self, config: RepoConfig, tables_to_delete: Sequence[FeatureView],
               tables_to_keep: Sequence[FeatureView], entities_to_delete: Sequence[Entity],
               entities_to_keep: Sequence[Entity], partial: bool) -> None:
        self._delete(config, tables_to_delete)

    # -- Feast's interface ---------------------------------------------------------------------------
    def online_write_batch(self, config: RepoConfig, table: FeatureView, data: list[Row],
                           progress: Callable[[int], Any] | None) -> None:
        self.write(config, table, data)
        if progress:
            progress(len(data))

    def online_read(self, config: RepoConfig, table: FeatureView, entity_keys: list[EntityKey],
                    requested_features: list[str] | None = None
                    ) -> list[tuple[datetime | None, dict[str, Value] | None]]:
        keys = [key_bytes(config, k) for k in entity_keys]
        found = {key: (ts, names, blob) for _v, key, ts, names, blob in
                 self._fetch(config, [_view_name(config, table)], keys, "vals")}
        want = set(requested_features) if requested_features else None
        out: list[tuple[datetime | None, dict[str, Value] | None]] = []
        for k in keys:
            hit = found.get(k)
            if hit is None:
                out.append((None, None))
                continue
            ts, names, blob = hit
            pairs = zip(names.split(SEP), RepeatedValue.FromString(blob).val, strict=True)
            out.append((from_us(ts), {n: v for n, v in pairs if want is None or n in want}))
        return out

    # -- driftloop's public API ----------------------------------------------------------------------
    def write(self, config: RepoConfig, table: FeatureView, data: Sequence[Row]) -> list[int]:
        """Write ``data`` monotonically (see the module doc); the indices of the rows stored. Of several rows
        of one entity in ``data``, the newest (the last of equals) is the one offered to the store."""
        best: dict[bytes, tuple[int, tuple[int, int]]] = {}
        for i, (ek, _values, ts, created) in enumerate(data):
            k = key_bytes(config, ek)
            order = (to_us(ts), NO_CREATED if created is None else to_us(created))
            if k not in best or order >= best[k][1]:
                best[k] = (i, order)
        if not best:
            return []
        rows = [(k, ts, created, *_encode(data[i][1])) for k, (i, (ts, created)) in best.items()]
        stored = self._upsert(config, _view_name(config, table), rows)
        return sorted(best[k][0] for k in stored)

    def write_columns(self, config: RepoConfig, table: FeatureView, columns: Mapping[str, Sequence[Any]],
                      event_us: Sequence[int], created_us: Sequence[int] | None) -> list[int]:
        """``write(config, table, feast_rows(table, columns, event_us, created_us))`` without building Feast
        rows: entity keys are serialised once per entity (cached) and only the rows offered are encoded."""
        joins = [(c.name, c.dtype.to_value_type()) for c in table.entity_columns]
        keys = self._key_bytes(config, joins, columns)
        best: dict[bytes, tuple[int, tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            order = (event_us[i], NO_CREATED if created_us is None else created_us[i])
            if k not in best or order >= best[k][1]:
                best[k] = (i, order)
        if not best:
            return []
        pick = [i for i, _order in best.values()]
        names = SEP.join(f.name for f in table.features)
        encoded = encode_rows([[columns[f.name][i] for i in pick] for f in table.features],
                                  [f.dtype.to_value_type() for f in table.features], len(pick))
        rows = [(k, ts, created, names, *enc) for (k, (_i, (ts, created))), enc in zip(best.items(), encoded,
                                                                                         strict=True)]
        stored = self._upsert(config, _view_name(config, table), rows)
        return sorted(best[k][0] for k in stored)

    def _key_bytes(self, config: RepoConfig, joins: list[tuple[str, ValueType]],
                   columns: Mapping[str, Sequence[Any]]) -> list[bytes]:
        """Each row's serialised entity key (``key_bytes``), cached per join keys, python types and values."""
        names = tuple(k for k, _ in joins)
        cols = [columns[k] for k in names]
        kinds = [set(map(type, c)) for c in cols]
        if all(len(k) == 1 for k in kinds):  # one python type per column: the values alone key the cache
            signature: tuple[Any, ...] = (names, *(k.pop() for k in kinds))
            rows: Sequence[Any] = cols[0] if len(cols) == 1 else list(zip(*cols, strict=True))
            values_of: Callable[[Any], tuple[Any, ...]] = (lambda v: (v,)) if len(cols) == 1 else tuple
        else:  # typed per row: 1, 1.0 and True are equal dict keys but need not serialise alike
            signature = (names, None)
            rows = [(vs, tuple(map(type, vs))) for vs in zip(*cols, strict=True)]
            values_of = operator.itemgetter(0)
        cache = self._keys.setdefault(signature, {})
        missing = [v for v in dict.fromkeys(rows) if v not in cache]
        if missing:
            if len(cache) + len(missing) > KEY_CACHE:
                cache.clear()
            values = zip(*(proto_values([values_of(v)[j] for v in missing], vt) for j, (_k, vt) in enumerate(joins)),
                         strict=True)
            for v, vs in zip(missing, values, strict=True):
                cache[v] = key_bytes(config, EntityKey(join_keys=list(names), entity_values=vs))
        return [cache[v] for v in rows]

    def read_matrix(self, config: RepoConfig, views: Sequence[tuple[FeatureView, Sequence[str]]],
                    keys: Sequence[bytes]) -> np.ndarray:
        """Numeric values of ``views`` (view, feature names) for the distinct ``keys`` (``key_bytes``), read
        in one query or pipeline: float64, one row per key, one column per (view, name) in order; NaN where
        nothing is stored or the value is not a number (booleans read as 0/1)."""
        offsets = np.cumsum([0] + [len(names) for _v, names in views])
        out = np.full((len(keys), int(offsets[-1])), np.nan)
        if not len(keys) or not offsets[-1]:
            return out
        names_of = {_view_name(config, v): (tuple(names), int(offsets[j])) for j, (v, names) in enumerate(views)}
        pos = {k: i for i, k in enumerate(keys)}.__getitem__
        fetched = list(self._fetch(config, list(names_of), keys, "nums"))
        fetched.sort(key=_VIEW_NAMES)  # rows of one view written with the same names together (C loops per row)
        for (view, names), group in itertools.groupby(fetched, _VIEW_NAMES):
            src, dst = self._plan(names, *names_of[view])
            if src:
                _views, found, _ts, _names, blobs = zip(*group, strict=True)
                rows = np.fromiter(map(pos, found), np.intp, len(found))
                got = np.frombuffer(b"".join(blobs), "<f8").reshape(len(blobs), -1)
                out[rows[:, None], dst] = got[:, src]
        return out

    def _plan(self, stored: str, wanted: tuple[str, ...], offset: int) -> tuple[list[int], np.ndarray]:
        """Which stored columns go to which output columns (cached: a view's names rarely change)."""
        plan = self._plans.get((stored, wanted, offset))
        if plan is None:
            at = {n: i for i, n in enumerate(stored.split(SEP))}
            pairs = [(at[n], offset + j) for j, n in enumerate(wanted) if n in at]
            plan = self._plans[(stored, wanted, offset)] = ([s for s, _ in pairs],
                                                            np.asarray([d for _, d in pairs], np.intp))
        return plan


# -- sqlite --------------------------------------------------------------------------------------------
TABLE = "driftloop_online"
SQL_ROWS, SQL_KEYS = 2000, 10_000  # rows per upsert statement, keys per select
COLUMNS = "project, view, entity_key, event_ts, created_ts, names, vals, nums"
UPSERT = (f"INSERT INTO {TABLE} AS o ({COLUMNS}) VALUES {{values}} "
          "ON CONFLICT (project, view, entity_key) DO UPDATE SET event_ts = excluded.event_ts, "
          "created_ts = excluded.created_ts, names = excluded.names, vals = excluded.vals, nums = excluded.nums "
          "WHERE (excluded.event_ts, excluded.created_ts) >= (o.event_ts, o.created_ts) RETURNING entity_key")


class MonotonicSqliteOnlineStoreConfig(FeastConfigBaseModel):
    """``online_store`` section of ``feature_store.yaml`` for the sqlite store."""

    type: Literal["driftloop.features.online_stores.MonotonicSqliteOnlineStore"] = (
        "driftloop.features.online_stores.MonotonicSqliteOnlineStore")
    path: StrictStr = "data/online.db"
    """The database file (relative paths are relative to the repo)."""
    busy_timeout_s: float = 30.0
    """How long a writer waits for another process's write to finish."""


class MonotonicSqliteOnlineStore(MonotonicOnlineStore):
    """The sqlite store: one connection per thread, one table for every view."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @staticmethod
    def db_path(config: RepoConfig) -> Path:
        path = Path(config.online_store.path)
        return path if path.is_absolute() or not config.repo_path else Path(config.repo_path) / path

    def _conn(self, config: RepoConfig) -> sqlite3.Connection:
        path = self.db_path(config)
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.path != path:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=config.online_store.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (project TEXT NOT NULL, view TEXT NOT NULL, "
                         "entity_key BLOB NOT NULL, event_ts INTEGER NOT NULL, created_ts INTEGER NOT NULL, "
                         "names TEXT NOT NULL, vals BLOB NOT NULL, nums BLOB NOT NULL, "
                         "PRIMARY KEY (project, view, entity_key)) WITHOUT ROWID")
            self._local.conn, self._local.path = conn, path
            self._local.limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return conn

    def _upsert(self, config: RepoConfig, view: str, rows: list[tuple[bytes, int, int, str, bytes, bytes]]
                ) -> set[bytes]:
        conn = self._conn(config)
        per = max(1, min(SQL_ROWS, self._local.limit // 8))
        stored: set[bytes] = set()
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: the batch is one transaction
        try:
            for i in range(0, len(rows), per):
                chunk = rows[i:i + per]
                sql = UPSERT.format(values=",".join(["(?,?,?,?,?,?,?,?)"] * len(chunk)))
                params = [x for r in chunk for x in (config.project, view, *r)]
                stored.update(k for (k,) in conn.execute(sql, params).fetchall())
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return stored

    def _fetch(self, config: RepoConfig, views: list[str], keys: Sequence[bytes], what: Literal["vals", "nums"]
               ) -> Iterable[Fetched]:
        conn = self._conn(config)
        per = max(1, min(SQL_KEYS, self._local.limit - len(views) - 1))
        head = (f"SELECT view, entity_key, event_ts, names, {what} FROM {TABLE} WHERE project = ? "
                f"AND view IN ({','.join('?' * len(views))}) AND entity_key IN ")
        out: list[Fetched] = []
        for i in range(0, len(keys), per):
            chunk = list(keys[i:i + per])
            out += conn.execute(f"{head}({','.join('?' * len(chunk))})", [config.project, *views, *chunk]).fetchall()
        return out

    def teardown(self, config: RepoConfig, tables: Sequence[FeatureView], entities: Sequence[Entity]) -> None:
        self._delete(config, tables)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _delete(self, config: RepoConfig, views: Sequence[FeatureView]) -> None:
        conn = self._conn(config)
        for v in views:
            conn.execute(f"DELETE FROM {TABLE} WHERE project = ? AND view = ?", (config.project, _view_name(config, v)))


# -- Redis ---------------------------------------------------------------------------------------------
# KEYS: entity hashes; ARGV[1]: view; then 5 per key: event µs, created µs, names, values, nums.
# Returns the 1-based positions of the keys stored.
UPSERT_LUA = """
local v = ARGV[1]
local tf, cf = 't:' .. v, 'c:' .. v
local stored = {}
for i, key in ipairs(KEYS) do
  local j = 2 + (i - 1) * 5
  local ts, cr = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  local old = redis.call('HMGET', key, tf, cf)
  local ots, ocr = tonumber(old[1]), tonumber(old[2])
  if ots == nil or ts > ots or (ts == ots and cr >= (ocr or -1)) then
    redis.call('HSET', key, tf, ARGV[j], cf, ARGV[j + 1], 'n:' .. v, ARGV[j + 2], 'v:' .. v, ARGV[j + 3],
               'f:' .. v, ARGV[j + 4])
    stored[#stored + 1] = i
  end
end
return stored
"""
FIELDS = ("t", "c", "n", "v", "f")
REDIS_CHUNK = 1000  # rows per script call (each call is atomic; each row is atomic on its own anyway)


class MonotonicRedisOnlineStoreConfig(FeastConfigBaseModel):
    """``online_store`` section of ``feature_store.yaml`` for the Redis store (one server)."""

    type: Literal["driftloop.features.online_stores.MonotonicRedisOnlineStore"] = (
        "driftloop.features.online_stores.MonotonicRedisOnlineStore")
    connection_string: StrictStr = "localhost:6379"
    """``host:port[,db=N][,password=...][,ssl=true]`` (Feast's Redis format, one server)."""


class MonotonicRedisOnlineStore(MonotonicOnlineStore):
    """The Redis store: one hash per entity, one Lua script per write batch."""

    def __init__(self) -> None:
        super().__init__()
        self._client: Any = None
        self._script: Any = None

    def client(self, config: RepoConfig) -> Any:
        """The ``redis.Redis`` client of the configured server."""
        if self._client is None:
            import redis

            host_port, *params = config.online_store.connection_string.split(",")
            host, _, port = host_port.partition(":")
            kwargs: dict[str, Any] = {}
            for p in params:
                k, _, v = p.partition("=")
                try:
                    kwargs[k.strip()] = json.loads(v)
                except json.JSONDecodeError:
                    kwargs[k.strip()] = v
            self._client = redis.Redis(host=host or "localhost", port=int(port or 6379), **kwargs)
            self._script = self._client.register_script(UPSERT_LUA)
        return self._client

    @staticmethod
    def _prefix(config: RepoConfig) -> bytes:
        return b"dl:" + config.project.encode() + b":"

    def _upsert(self, config: RepoConfig, view: str, rows: list[tuple[bytes, int, int, str, bytes, bytes]]
                ) -> set[bytes]:
        self.client(config)
        prefix = self._prefix(config)
        stored: set[bytes] = set()
        for i in range(0, len(rows), REDIS_CHUNK):
            chunk = rows[i:i + REDIS_CHUNK]
            args: list[Any] = [view]
            for _k, ts, created, names, vals, nums in chunk:
                args += [ts, created, names, vals, nums]
            got = self._script(keys=[prefix + r[0] for r in chunk], args=args)
            stored.update(chunk[p - 1][0] for p in got)
        return stored

    def _fetch(self, config: RepoConfig, views: list[str], keys: Sequence[bytes], what: Literal["vals", "nums"]
               ) -> Iterable[Fetched]:
        client = self.client(config)
        prefix = self._prefix(config)
        field = "v" if what == "vals" else "f"
        fields = [f"{x}:{v}" for v in views for x in ("t", "n", field)]
        with client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hmget(prefix + k, fields)
            replies = pipe.execute()
        out: list[Fetched] = []
        for k, got in zip(keys, replies, strict=True):
            for j, v in enumerate(views):
                ts, names, blob = got[3 * j:3 * j + 3]
                if ts is not None:
                    out.append((v, k, int(ts), names.decode(), blob))
        return out

    def teardown(self, config: RepoConfig, tables: Sequence[FeatureView], entities: Sequence[Entity]) -> None:
        self._delete(config, tables)
        if self._client is not None:
            self._client.close()
            self._client = None

    def _delete(self, config: RepoConfig, views: Sequence[FeatureView]) -> None:
        """Remove the views' fields from every entity hash of the project (an emptied hash goes too)."""
        if not views:
            return
        client = self.client(config)
        fields = [f"{x}:{_view_name(config, v)}" for v in views for x in FIELDS]
        pattern = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else bytes([c]) for c in self._prefix(config))
        with client.pipeline(transaction=False) as pipe:
            for n, key in enumerate(client.scan_iter(match=pattern + b"*", count=1000), 1):
                pipe.hdel(key, *fields)
                if n % 1000 == 0:
                    pipe.execute()
            pipe.execute()


__all__ = ["MonotonicOnlineStore", "MonotonicRedisOnlineStore", "MonotonicRedisOnlineStoreConfig",
           "MonotonicSqliteOnlineStore", "MonotonicSqliteOnlineStoreConfig", "feast_rows", "key_bytes"]
