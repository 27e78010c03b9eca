"""The ``driftloop`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime

from driftloop.core.logsetup import setup_logging
from driftloop.core.settings import Settings, get_settings

WORKERS = ("streams", "serving", "drift", "retrain")


def _settings_from_stack(s: Settings) -> Settings:
    """Use the running embedded stack's broker when none is configured."""
    if s.bootstrap_servers or not s.stack_file.exists():
        return s
    stack = json.loads(s.stack_file.read_text())
    return s.model_copy(update={"bootstrap_servers": stack["bootstrap_servers"],
                                "mlflow_tracking_uri": s.mlflow_tracking_uri or stack.get("mlflow_uri")})


def cmd_worker(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.core.metrics import serve_metrics

    if a.name != "streams":
        serve_metrics(s.metrics_port)
    if a.name == "streams":
        from driftloop.streams.app import run
    elif a.name == "serving":
        from driftloop.serving.worker import run
    elif a.name == "drift":
        from driftloop.drift.monitor import run
    else:
        from driftloop.retrain.controller import run
    run(s)
    return 0


def cmd_produce(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.producer import produce

    gen = produce(_settings_from_stack(s), rate=a.rate, count=a.count, duration=a.duration, seed=a.seed,
                  drift_at=a.drift_at)
    print(f"produced {gen.produced} impressions and {gen.clicks} clicks")
    return 0


def cmd_tail(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.core.kafka import good_messages, make_consumer

    s = _settings_from_stack(s)
    c = make_consumer(s, f"tail-{os.getpid()}-{time.time_ns()}", [a.topic],
                      **{"auto.offset.reset": "earliest" if a.from_beginning else "latest"})
    n = 0
    deadline = time.monotonic() + a.timeout if a.timeout else None
    try:
        while (a.max is None or n < a.max) and (deadline is None or time.monotonic() < deadline):
            for m in good_messages(c.consume(100, 0.2)):
                headers = {k: v.decode(errors="replace") for k, v in (m.headers() or [])}
                value = (m.value() or b"").decode(errors="replace")
                print(json.dumps({"partition": m.partition(), "offset": m.offset(), "headers": headers})
                      if headers else "", value, flush=True)
                n += 1
                if a.max is not None and n >= a.max:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        c.close()
    return 0


def cmd_apply(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.features.repo import apply, load_definitions

    store = apply(s)
    names = [type(o).__name__ + ":" + getattr(o, "name", "?") for o in load_definitions(s.feature_repo_dir)]
    print(f"applied to {store.repo_path}: " + ", ".join(names))
    return 0


def _utc(text: str) -> datetime:
    """An ISO 8601 time; naive means UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-23T10:00:00Z)") from e
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cmd_backfill(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.features.backfill import backfill

    try:
        r = backfill(s, a.view, a.start, a.end, materialize=a.materialize, dry_run=a.dry_run)
    except (ValueError, FileNotFoundError) as e:
        print(f"driftloop backfill: {e}", file=sys.stderr)
        return 2
    verb = "recomputed (dry run, nothing written)" if a.dry_run else "recomputed and replaced"
    print(f"{r['view']}: {r['rows']} rows {verb} in {r['seconds']} s" + (", materialized online" if r["materialized"]
                                                                          else ""))
    print(json.dumps(r))
    return 0


def cmd_consistency(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.features.consistency import as_json, consistency, report

    try:
        rows = consistency(s, a.view or None, a.start, a.end, online=not a.offline_only)
    except (ValueError, FileNotFoundError) as e:
        print(f"driftloop consistency: {e}", file=sys.stderr)
        return 2
    print(report(rows))
    out = as_json(rows)
    print(json.dumps(out))
    return 0 if out["mismatched"] == 0 or not a.fail_on_mismatch else 1


def cmd_maintain(a: argparse.Namespace, s: Settings) -> int:
    from dataclasses import asdict

    from driftloop.features.maintenance import maintain

    try:
        reports = maintain(s, a.retention_hours, vacuum=not a.no_vacuum)
    except ValueError as e:
        print(f"driftloop maintain: {e}", file=sys.stderr)
        return 2
    for r in reports:
        print(f"{r.table:<22} v{r.version:<6} files {r.files_before:>5} → {r.files_after:<5} "
              f"vacuumed {r.vacuumed:>5}  {r.seconds:.2f} s")
    print(json.dumps([asdict(r) for r in reports]))
    return 0


def cmd_up(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.supervisor import Stack, start_detached

    if a.detach:
        info = start_detached(s, timeout=a.timeout)
        print(json.dumps(info, indent=2))
        return 0
    stack = Stack(s)
    stack.start(timeout=a.timeout)
    print(json.dumps(stack.info, indent=2), flush=True)
    stack.run_forever()
    return 0


def cmd_down(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.supervisor import stop_stack

    return 0 if stop_stack(s, timeout=a.timeout) else 1


def cmd_demo(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.demo import run_demo

    return 0 if run_demo(s, rate=a.rate, timeout=a.timeout) else 1


def cmd_rollback(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.registry import models
    from driftloop.core.kafka import make_producer

    s = _settings_from_stack(s)
    if not s.bootstrap_servers:
        print("driftloop rollback: no broker to announce it on: start the stack (driftloop up -d) or set "
              "DRIFTLOOP_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 2
    try:
        ev = models.rollback(s, make_producer(s), a.model, to=a.to)
    except models.RollbackError as e:
        print(f"driftloop rollback: {e}", file=sys.stderr)
        return 1
    print(f"{ev.model_name}: champion v{ev.previous_version} → v{ev.version} (announced on models.promoted)")
    return 0


def cmd_bench(a: argparse.Namespace, s: Settings) -> int:
    if a.what == "streams":
        from driftloop.bench.streams import run

        run(s, events=a.events, rate=a.rate, fresh_s=a.fresh_seconds, baseline_events=a.baseline_events)
    elif a.what == "serving":
        from driftloop.bench.serving import run_serving

        run_serving(s, events=a.events, rate=a.rate, seconds=a.seconds)
    elif a.what == "swap":
        from driftloop.bench.serving import run_swap

        r = run_swap(s, swaps=a.swaps, rate=a.rate, every_s=a.every)
        return 0 if r["lost"] == r["duplicated"] == r["misversioned"] == 0 else 1
    elif a.what == "online":
        from driftloop.bench.online import run as run_online

        run_online(s, users=a.users, reads=a.reads)
    elif a.what == "training":
        from driftloop.bench.training import run as run_training

        run_training(s, labels=a.labels, rows_per_view=a.rows_per_view, users=a.users,
                     baseline_labels=a.baseline_labels)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftloop", description=__doc__)
    p.add_argument("--data-dir", help="state folder (default .driftloop, env DRIFTLOOP_DATA_DIR)")
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="run one worker in the foreground")
    w.add_argument("name", choices=WORKERS)
    w.set_defaults(fn=cmd_worker)

    pr = sub.add_parser("produce", help="publish synthetic impressions and clicks")
    pr.add_argument("--rate", type=float, default=500.0, help="impressions per second")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--count", type=int)
    g.add_argument("--duration", type=float, help="seconds")
    pr.add_argument("--seed", type=int, default=7)
    pr.add_argument("--drift-at", type=int, default=None, help="drift from the N-th impression on")
    pr.set_defaults(fn=cmd_produce)

    t = sub.add_parser("tail", help="print records of a topic (logical name, e.g. predictions)")
    t.add_argument("topic")
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--max", type=int, default=None, help="stop after N records")
    t.add_argument("--timeout", type=float, default=None, help="stop after N seconds")
    t.set_defaults(fn=cmd_tail)

    ap = sub.add_parser("apply", help="apply the Feast feature repo in the data directory")
    ap.set_defaults(fn=cmd_apply)

    up = sub.add_parser("up", help="start the embedded stack (broker + workers)")
    up.add_argument("--detach", "-d", action="store_true", help="return once the stack is ready")
    up.add_argument("--timeout", type=float, default=180.0)
    up.set_defaults(fn=cmd_up)

    dn = sub.add_parser("down", help="stop the embedded stack")
    dn.add_argument("--timeout", type=float, default=30.0)
    dn.set_defaults(fn=cmd_down)

    d = sub.add_parser("demo", help="run the end-to-end loop with a drift in the middle")
    d.add_argument("--rate", type=float, default=400.0)
    d.add_argument("--timeout", type=float, default=540.0)
    d.set_defaults(fn=cmd_demo)
    rb = sub.add_parser("rollback", help="move the champion alias back to the version it replaced")
    rb.add_argument("model", help="registered model name (e.g. ctr)")
    rb.add_argument("--to", help="a specific version instead of the previous champion")
    rb.set_defaults(fn=cmd_rollback)

    bf = sub.add_parser("backfill", help="recompute a stream feature view from bronze with Spark (Spark Connect)")
    bf.add_argument("--view", required=True, help="stream feature view name")
    bf.add_argument("--start", required=True, type=_utc, help="ISO 8601 event time, inclusive (naive = UTC)")
    bf.add_argument("--end", required=True, type=_utc, help="ISO 8601 event time, exclusive")
    bf.add_argument("--materialize", action="store_true", help="also materialize the range to the online store")
    bf.add_argument("--dry-run", action="store_true", help="compute only; write nothing")
    bf.set_defaults(fn=cmd_backfill)

    cs = sub.add_parser("consistency", help="mismatch share: stream offline rows vs Spark recompute, online vs "
                                            "latest; exits 1 on any mismatch with --fail-on-mismatch")
    cs.add_argument("--view", action="append", help="a view (repeatable; default: every stream feature view)")
    cs.add_argument("--start", type=_utc, default=None)
    cs.add_argument("--end", type=_utc, default=None)
    cs.add_argument("--offline-only", action="store_true", help="skip the online check")
    cs.add_argument("--fail-on-mismatch", action="store_true")
    cs.set_defaults(fn=cmd_consistency)

    mt = sub.add_parser("maintain", help="compact, checkpoint and vacuum the Delta tables (safe while writing)")
    mt.add_argument("--retention-hours", type=float, default=168.0, help="vacuum files unreferenced this long")
    mt.add_argument("--no-vacuum", action="store_true")
    mt.set_defaults(fn=cmd_maintain)

    b = sub.add_parser("bench", help="run a benchmark; the last line of output is one JSON object")
    bs = b.add_subparsers(dest="what", required=True)
    st = bs.add_parser("streams", help="streams throughput, freshness and the per-event baseline")
    st.add_argument("--events", type=int, default=200_000, help="impressions in the backlog (+20%% clicks)")
    st.add_argument("--rate", type=float, default=5000.0, help="events/s for the freshness phase")
    st.add_argument("--fresh-seconds", type=float, default=20.0)
    st.add_argument("--baseline-events", type=int, default=5000)
    sv = bs.add_parser("serving", help="serving throughput with feature lookup, and latency at a fixed rate")
    sv.add_argument("--events", type=int, default=100_000, help="impressions in the backlog (+20%% clicks)")
    sv.add_argument("--rate", type=float, default=5000.0, help="impressions/s for the latency phase")
    sv.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    sw = bs.add_parser("swap", help="champion promotions under load; every prediction audited")
    sw.add_argument("--swaps", type=int, default=10)
    sw.add_argument("--rate", type=float, default=2000.0, help="impressions/s during the swaps")
    sw.add_argument("--every", type=float, default=2.0, help="seconds between promotions")
    on = bs.add_parser("online", help="online store read latency p50/p99 for 1 and 100 entities")
    on.add_argument("--users", type=int, default=10_000, help="entities written to the online store")
    on.add_argument("--reads", type=int, default=2000, help="timed reads per size")
    tr = bs.add_parser("training", help="point-in-time training set: N labels × the example repo's 3 views")
    tr.add_argument("--labels", type=int, default=1_000_000)
    tr.add_argument("--rows-per-view", type=int, default=1_000_000, help="feature rows in each view's Delta table")
    tr.add_argument("--users", type=int, default=50_000)
    tr.add_argument("--baseline-labels", type=int, default=100_000,
                    help="also join this many labels on Feast's DuckDB store over Parquet (0: skip)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir and not os.path.isdir(mp_dir):  # left over from a Feast import in a parent process
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    args = build_parser().parse_args(argv)
    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = get_settings(**overrides)
    setup_logging(settings.log_level, component=getattr(args, "name", None) or args.cmd)
    if args.cmd in ("produce", "tail"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.fn(args, settings)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
