"""Recompute stream feature views from the bronze raw-event tables with Spark (Spark Connect).

The computation reproduces ``features/windows.py`` exactly. For one aggregation group (a column, a
slide, ``n`` buckets), each bronze event ``j`` *contributes* to the ``n`` target buckets
``b(j) .. b(j)+n-1``, and each event ``i`` *asks* at target ``b(i)``. Within (entity, target bucket),
ordered by consumption (``_offset``, contributions before the question at the same offset), a running
count/sum/min/max over the contributions so far is the window value the engine gave event ``i``:
every accepted event of the entity with bucket in ``(b(i)-n, b(i)]`` consumed no later than ``i``.
Late events never reach bronze, so they are excluded as in the stream.

Spark runs on ``settings.spark_remote`` (a Spark Connect server with delta-spark) or on an embedded
``pysail`` server started for the session.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from driftloop.core.declarations import bronze_table
from driftloop.core.delta import TS, open_table
from driftloop.core.settings import Settings
from driftloop.features.online_write import OnlineSink
from driftloop.features.repo import open_store
from driftloop.features.windows import ViewSpec, specs_from_feast

log = logging.getLogger(__name__)

US = 1_000_000


@contextlib.contextmanager
def spark_session(settings: Settings) -> Iterator[object]:
    """A pyspark Spark Connect session: ``settings.spark_remote``, or an embedded pysail server."""
    from pyspark.sql import SparkSession

    server = None
    remote = settings.spark_remote
    if not remote:
        from pysail.spark import SparkConnectServer

        server = SparkConnectServer("127.0.0.1", 0)
        server.start(background=True)
        host, port = server.listening_address
        remote = f"sc://{host}:{port}"
        log.info("embedded Spark Connect (pysail) on %s", remote)
    spark = SparkSession.builder.remote(remote).getOrCreate()
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    try:
        yield spark
    finally:
        spark.stop()
        if server is not None:
            server.stop()


def bronze_path(settings: Settings, view: ViewSpec) -> Path:
    return settings.offline_dir / bronze_table(view.topic)


def view_spec(settings: Settings, name: str) -> ViewSpec:
    store = open_store(settings)
    views = {v.name: v for v in store.list_stream_feature_views()}
    if name not in views:
        raise ValueError(f"no stream feature view {name!r} in the registry (have: {', '.join(sorted(views))})")
    spec = specs_from_feast([views[name]])[0]
    if spec.udf is not None:
        raise ValueError(f"view {name!r} transforms events with a udf; the Spark backfill recomputes views "
                         "that aggregate source columns directly")
    return spec


def margin_us(view: ViewSpec) -> int:
    """How much event time before a range start can still reach a window in the range."""
    return int(max((a.n_buckets + 1) * a.bucket_s for a in view.aggs) * US)


def _group_sql(view: ViewSpec, series: str, slide: float, n: int, aggs: tuple[tuple[str, str], ...],
               numeric: bool, asks: str) -> str:
    """SQL of one aggregation group: one row per asking event with its aggregation columns."""
    col = next(s.column for s in view.series if s.key == series)
    x = f"CAST(`{col}` AS DOUBLE)" if numeric else f"CASE WHEN `{col}` IS NULL THEN NULL ELSE 0.0 END"
    key = f"`{view.entity_key}`"
    b = f"CAST(FLOOR(ts / {US}.0 / {slide!r}) AS BIGINT)"
    frame = (f"OVER (PARTITION BY {key}, tb ORDER BY _offset, kind "
             "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)")
    outs = []
    for name, fn in aggs:
        if fn == "count":
            outs.append(f"n AS `{name}`")
        elif fn == "mean":
            outs.append(f"CASE WHEN n > 0 THEN s / n END AS `{name}`")
        elif fn == "sum":
            outs.append(f"CASE WHEN n > 0 THEN s END AS `{name}`")
        else:
            outs.append(f"CASE WHEN n > 0 THEN {fn[:2]} END AS `{name}`")
    return f"""
        SELECT _topic, _partition, _offset, {', '.join(outs)} FROM (
          SELECT _topic, _partition, _offset, kind,
                 COUNT(x) {frame} AS n, SUM(x) {frame} AS s, MIN(x) {frame} AS mi, MAX(x) {frame} AS ma
          FROM (
            SELECT {key}, _topic, _partition, _offset, 0 AS kind, {x} AS x, t AS tb
              FROM events LATERAL VIEW explode(sequence({b}, {b} + {n - 1})) z AS t
            UNION ALL
            SELECT {key}, _topic, _partition, _offset, 1 AS kind, CAST(NULL AS DOUBLE) AS x, {b} AS tb
              FROM {asks}
          ) u
        ) w WHERE kind = 1"""


def compute(spark, settings: Settings, view: ViewSpec, start_us: int | None = None,
            end_us: int | None = None, latest: bool = False):
    """Spark DataFrame of the view's values, one row per bronze event with ``start <= ts < end``
    (``entity, features..., ts, _topic, _partition, _offset``).

    ``latest``: instead one row per entity, the value at its newest event time over every event
    consumed (what the online store holds after the stream has caught up)."""
    path = bronze_path(settings, view)
    if open_table(path) is None:
        raise FileNotFoundError(f"no bronze table at {path}: nothing has been streamed for {view.topic}")
    key = f"`{view.entity_key}`"
    cols = {view.entity_key, "ts", "_topic", "_partition", "_offset", *(s.column for s in view.series)}
    ev = spark.read.format("delta").load(str(path)).select(*cols).dropDuplicates(["_topic", "_partition", "_offset"])
    lo = None if start_us is None else start_us - margin_us(view)
    if lo is not None:
        ev = ev.where(f"ts >= {lo}")
    if end_us is not None and not latest:
        ev = ev.where(f"ts < {end_us + margin_us(view)}")
    ev.createOrReplaceTempView("events")
    if latest:  # one question per entity at its newest time, after its last consumed event
        spark.sql(f"""SELECT {key}, MAX(ts) AS ts, FIRST(_topic) AS _topic, MAX(_partition) AS _partition,
                      MAX(_offset) AS _offset FROM events GROUP BY {key}""").createOrReplaceTempView("asks")
    else:
        where = " AND ".join([*([f"ts >= {start_us}"] if start_us is not None else []),
                              *([f"ts < {end_us}"] if end_us is not None else [])]) or "TRUE"
        spark.sql(f"SELECT * FROM events WHERE {where}").createOrReplaceTempView("asks")
    out = spark.sql(f"SELECT {key}, ts, _topic, _partition, _offset FROM asks")
    for series, slide, n, aggs in view.plan:
        numeric = next(s.numeric for s in view.series if s.key == series)
        part = spark.sql(_group_sql(view, series, slide, n, aggs, numeric, "asks"))
        # ``latest`` asks carry the entity's max offset: every event is consumed before the question
        out = out.join(part, ["_topic", "_partition", "_offset"], "left")
    return out


def to_offline_rows(table: pa.Table, view: ViewSpec, created_us: int) -> pa.Table:
    """Spark's result as the stream's offline row schema (counts int64, timestamps ``timestamp[us, UTC]``)."""
    n = table.num_rows
    cols: dict[str, pa.Array] = {view.entity_key: table.column(view.entity_key)}
    for a in view.aggs:
        c = table.column(a.name)
        cols[a.name] = c.cast(pa.int64()) if a.function == "count" else c.cast(pa.float64())
    cols["event_timestamp"] = table.column("ts").cast(pa.int64()).cast(pa.timestamp("us")).cast(TS)
    cols["created"] = pa.array([created_us] * n, pa.int64()).cast(pa.timestamp("us")).cast(TS)
    cols["_topic"] = table.column("_topic")
    cols["_partition"] = table.column("_partition").cast(pa.int64())
    cols["_offset"] = table.column("_offset").cast(pa.int64())
    return pa.table(cols)


def backfill(settings: Settings, view_name: str, start: datetime, end: datetime, materialize: bool = False,
             dry_run: bool = False) -> dict[str, object]:
    """Recompute ``view_name`` for events with ``start <= ts < end`` and replace those rows of its Delta
    table in one commit (idempotent: a rerun writes the same rows again)."""
    if end <= start:
        raise ValueError(f"--end {end.isoformat()} must be after --start {start.isoformat()}")
    view = view_spec(settings, view_name)
    start_us, end_us = int(start.timestamp() * US), int(end.timestamp() * US)
    t = time.perf_counter()
    with spark_session(settings) as spark:
        log.info("recomputing %s for %s .. %s from %s", view.name, start.isoformat(), end.isoformat(),
                 bronze_path(settings, view))
        table = compute(spark, settings, view, start_us, end_us).toArrow()
    rows = to_offline_rows(table, view, int(time.time() * US)).sort_by([("_partition", "ascending"),
                                                                        ("_offset", "ascending")])
    seconds = time.perf_counter() - t
    target = settings.offline_dir / view.name
    if not dry_run:
        if open_table(target) is None:
            write_deltalake(str(target), rows)
        else:
            write_deltalake(str(target), rows, mode="overwrite", predicate=_predicate(start_us, end_us))
        log.info("replaced the rows of %s in [%s, %s) with %d recomputed rows", target, start, end, rows.num_rows)
        if materialize:
            materialize_latest(settings, view, rows)
    return {"view": view.name, "rows": rows.num_rows, "seconds": round(seconds, 2), "written": not dry_run,
            "materialized": materialize and not dry_run}


def materialize_latest(settings: Settings, view: ViewSpec, rows: pa.Table, chunk: int = 1000) -> int:
    """Write each entity's newest recomputed row online, unless the store already holds a newer one
    (a backfill of an old range never moves an online value back in time)."""
    df = rows.to_pandas().sort_values(["event_timestamp", "_partition", "_offset"], kind="stable")
    df = df.groupby(view.entity_key, sort=False).tail(1)
    for c in ("event_timestamp", "created"):
        df[c] = df[c].astype("datetime64[us, UTC]").astype("int64")
    records = df[[view.entity_key, *(a.name for a in view.aggs), "event_timestamp", "created"]].to_dict("records")
    sink = OnlineSink(open_store(settings))
    written = sum(sink.write(view.name, records[i:i + chunk], replace_same_instant=False)
                  for i in range(0, len(records), chunk))
    log.info("materialized %d of %d entities of %s online (the others hold newer values)", written, len(records),
             view.name)
    return written


def _predicate(start_us: int, end_us: int) -> str:
    """A delta-rs (DataFusion) predicate on ``event_timestamp`` for ``[start, end)``, typed ``timestamp[us, UTC]``."""
    ts = """'Timestamp(Microsecond, Some("UTC"))'"""
    return f"event_timestamp >= arrow_cast({start_us}, {ts}) AND event_timestamp < arrow_cast({end_us}, {ts})"
