"""The ``driftloop`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driftloop.core.declarations import Declarations, LabelSpec
from driftloop.core.logsetup import quiet_warnings, setup_logging
from driftloop.core.settings import Settings, get_settings
from driftloop.examples import DEFAULT as DEFAULT_EXAMPLE
from driftloop.examples import names as example_names

WORKERS = ("streams", "serving", "drift", "retrain")


def _settings_from_stack(s: Settings) -> Settings:
    """Use the running embedded stack's broker (``<data-dir>/stack.json``) when none is configured."""
    from driftloop.app.stackinfo import running_stack

    stack = None if s.bootstrap_servers else running_stack(s)
    if stack is None:
        return s
    return s.model_copy(update={"bootstrap_servers": stack["bootstrap_servers"],
                                "mlflow_tracking_uri": s.mlflow_tracking_uri or stack.get("mlflow_uri")})


def _fail(cmd: str, lines: list[str] | str, code: int = 1) -> int:
    """Print each problem on its own line, prefixed with the command, to stderr."""
    for line in [lines] if isinstance(lines, str) else lines:
        print(f"driftloop {cmd}: {line}", file=sys.stderr)
    return code


def _declarations(s: Settings) -> Declarations:
    """The applied declarations (the repo is applied first if it never was)."""
    if s.declarations_file.exists():
        return Declarations.load(s.declarations_file)
    from driftloop.features.repo import declarations

    return declarations(s)


def cmd_worker(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.core.metrics import serve_metrics

    if a.name in ("drift", "retrain"):  # streams and serving start theirs once their consumers exist
        serve_metrics(s.metrics_port, a.name, s.metrics_host)
    if a.name == "streams":
        from driftloop.streams.app import run
    elif a.name == "serving":
        from driftloop.serving.worker import run
    elif a.name == "drift":
        from driftloop.drift.worker import run
    else:
        from driftloop.retrain.controller import run
    rc = run(s)
    return rc if isinstance(rc, int) else 0  # core.worker.RESTART_EXIT: declarations changed


def cmd_init(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.features.repo import init_repo

    target = Path(a.dir)
    try:
        copied = init_repo(target, a.example)
    except (ValueError, FileExistsError) as e:
        return _fail("init", str(e))
    for f in copied:
        print(f"created {f}")
    if not copied:
        print(f"{target} holds the {a.example or DEFAULT_EXAMPLE} example already")
    repo = target.resolve()
    print(f"\nNext steps:\n  DRIFTLOOP_REPO={repo} driftloop apply          # validate and register the declarations"
          f"\n  DRIFTLOOP_REPO={repo} driftloop up -d          # start the stack"
          f"\n  DRIFTLOOP_REPO={repo} driftloop produce --duration 60")
    return 0


def cmd_apply(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.features.repo import RepoError, apply

    try:
        _, plan, decls = apply(s, dry_run=a.plan)
    except (RepoError, FileNotFoundError) as e:
        return _fail("apply", e.problems if isinstance(e, RepoError) else str(e))
    print("\n".join(plan.lines() or ["no changes"]))
    if a.plan:
        return 0
    print(f"applied {s.feature_repo_dir}: {len(decls.models)} model(s) "
          f"({', '.join(decls.models) or 'none'}), {len(decls.topics)} event topic(s)")
    if s.bootstrap_servers:  # a broker is configured or a stack runs: create the declared topics
        from driftloop.core.topics import ensure_topics

        try:
            created = ensure_topics(s)
        except ValueError as e:  # a model's scored and label topics differ in partition count
            return _fail("apply", str(e))
        if created:
            print(f"created topics {', '.join(created)}")
    return 0


def label_rule(label: LabelSpec) -> str:
    """A label rule in one line, e.g. ``outcome events.x.id within 5s``."""
    if label.kind == "outcome":
        rule = f"outcome {label.topic}.{label.id_field} within {label.window_s:g}s"
    else:
        rule = f"field {label.topic}.{label.id_field}"
    return rule + (f" value {label.value_field}" if label.value_field else "")


def _champion(s: Settings, name: str) -> str | None:
    """The champion version of a model (MLflow), or None; a missing sqlite store is not created."""
    uri = s.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    from driftloop.registry.versions import alias_version

    return alias_version(s, name)


def cmd_models(a: argparse.Namespace, s: Settings) -> int:
    decls = _declarations(s)
    rows: list[dict[str, Any]] = [
        {"name": m.name, "task": m.task, "metric": m.metric, "topic": m.topic, "feature_service": m.feature_service,
         "features": m.features, "label": label_rule(m.label), "champion": _champion(s, m.name),
         "generator": m.generator, "source_file": m.source_file} for m in decls.models.values()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models declared in {s.feature_repo_dir}")
        return 0
    table = [("MODEL", "TASK", "METRIC", "SCORES", "FEATURES", "LABEL", "CHAMPION")] + [
        (r["name"], r["task"], r["metric"], r["topic"], f"{r['feature_service']} ({len(r['features'])})", r["label"],
         r["champion"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_produce(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.producer import load_generator, produce
    from driftloop.core.topics import ensure_topics

    if not s.bootstrap_servers:
        return _fail("produce", "no broker: start the stack (driftloop up -d) or set DRIFTLOOP_BOOTSTRAP_SERVERS", 2)
    decls = _declarations(s)
    names = a.model or [n for n, m in decls.models.items() if m.generator]
    if not names:
        return _fail("produce", "no declared model has a generator (Model(generator='module:Class'))")
    drift = a.drift_model or names
    unknown = sorted(set(names + drift) - set(decls.models))
    if unknown:
        return _fail("produce", f"unknown model(s) {', '.join(unknown)}; declared: {', '.join(decls.models)}")
    try:
        gens = [load_generator(s, n, seed=a.seed, drift_at=a.drift_at if n in drift else None) for n in names]
    except (ValueError, ImportError, AttributeError) as e:
        return _fail("produce", str(e))
    try:
        ensure_topics(s)
    except ValueError as e:
        return _fail("produce", str(e))
    sent = produce(s, gens, rate=a.rate, count=a.count, duration=a.duration)
    print(f"produced {sent} scored events per model for {', '.join(names)}")
    return 0


def cmd_tail(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.core.kafka import good_messages, make_consumer

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

    try:
        if a.detach:
            info = start_detached(s, timeout=a.timeout, progress=lambda m: print(f"driftloop up: {m}", file=sys.stderr))
            print(json.dumps(info, indent=2))
            return 0
        stack = Stack(s)
        stack.start(timeout=a.timeout)
    except (RuntimeError, TimeoutError) as e:
        return _fail("up", str(e).splitlines())
    print(json.dumps(stack.info, indent=2), flush=True)
    stack.run_forever()
    return 0


def cmd_down(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.supervisor import stop_stack

    return 0 if stop_stack(s, timeout=a.timeout) else 1


def cmd_demo(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.demo import run_demo

    extra = {"drift_model": a.drift_model} if a.drift_model else {}
    return 0 if run_demo(s, rate=a.rate, timeout=a.timeout, **extra) else 1


def _announcing(cmd: str, s: Settings) -> Settings | int:
    """Settings with a broker to announce an alias move on, or the exit code of a clear failure."""
    if not s.bootstrap_servers:
        return _fail(cmd, "no broker to announce it on: start the stack (driftloop up -d) or set "
                          "DRIFTLOOP_BOOTSTRAP_SERVERS", 2)
    return s


def _alias_move(cmd: str, a: argparse.Namespace, s: Settings) -> int:
    """``promote`` and ``rollback``: the checked move, recorded in the alias ledger and announced."""
    from driftloop.core.kafka import make_producer
    from driftloop.registry.aliases import RollbackError
    from driftloop.registry.ledger import cli_actor
    from driftloop.retrain.evaluation import RefusedError, promote_checked, rollback_checked

    checked = _announcing(cmd, s)
    if isinstance(checked, int):
        return checked
    try:
        spec = _declarations(checked).model(a.model)
    except KeyError as e:
        return _fail(cmd, str(e.args[0]))
    try:
        if cmd == "promote":
            ev = promote_checked(checked, make_producer(checked), spec, a.version, reason=a.reason, actor=cli_actor())
        else:
            ev = rollback_checked(checked, make_producer(checked), spec, to=a.to, reason=a.reason or "",
                                  actor=cli_actor())
    except (RefusedError, RollbackError) as e:
        return _fail(cmd, [str(e), *(f"{k}: {v}" for k, v in getattr(e, "checks", {}).items())])
    print(f"{ev.model_name}: champion v{ev.previous_version} → v{ev.version} (ledger recorded; announced on "
          "models.promoted)")
    return 0


def cmd_promote(a: argparse.Namespace, s: Settings) -> int:
    return _alias_move("promote", a, s)


def cmd_rollback(a: argparse.Namespace, s: Settings) -> int:
    return _alias_move("rollback", a, s)


def cmd_history(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.retrain.history import chain, render

    try:
        _declarations(s).model(a.model)
    except KeyError as e:
        return _fail("history", str(e.args[0]))
    c = chain(s, a.model)
    print(json.dumps(c, default=str) if a.json else "\n".join(render(c)))
    return 0


def cmd_usage(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.core.usage import KINDS, totals

    rows = totals(s, a.since, a.model)
    if a.json:
        print(json.dumps({"since": a.since.isoformat() if a.since else None, "models": rows}))
        return 0
    if not rows:
        print("no usage recorded" + (f" since {a.since.isoformat()}" if a.since else ""))
        return 0
    head = ("MODEL", "TRAINING S", "SCORING S", "EVENTS", "PREDICTIONS")
    table = [head] + [(m, *(f"{v[k]:.1f}" if k.endswith("seconds") else f"{v[k]:.0f}" for k in KINDS))
                      for m, v in sorted(rows.items())]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return 0


def cmd_status(a: argparse.Namespace, s: Settings) -> int:
    from driftloop.app.status import cmd_status as status

    return status(a, s)


def cmd_bench(a: argparse.Namespace, s: Settings) -> int:
    if a.what == "streams":
        from driftloop.bench.streams import run

        run(s, events=a.events, rate=a.rate, fresh_s=a.fresh_seconds, baseline_events=a.baseline_events,
            repeats=a.repeats)
    elif a.what == "engine":
        from driftloop.bench.engine import run as run_engine

        run_engine(s, events=a.events, batch=a.batch, repeats=a.repeats)
    elif a.what == "serving":
        from driftloop.bench.serving import run_serving

        run_serving(s, events=a.events, rate=a.rate, seconds=a.seconds, int8_tolerance=a.int8_tolerance)
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
    elif a.what == "drift":
        from driftloop.bench.drift import run as run_drift

        run_drift(rows_ref=a.reference_rows, rows_window=a.window_rows, columns=a.columns, seed=a.seed)
    elif a.what == "loop":
        from driftloop.bench.loop import run as run_loop

        return 0 if run_loop(s, rate=a.rate, timeout=a.timeout, drift_model=a.drift_model,
                             overhead_rows=a.overhead_rows)["closed"] else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    # the global options, accepted before or after the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="state folder (default .driftloop, env DRIFTLOOP_DATA_DIR)")
    common.add_argument("--repo", default=argparse.SUPPRESS,
                        help="the feature repo: Feast definitions and model declarations (env DRIFTLOOP_REPO; "
                             "default <data-dir>/feature_repo)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    p = argparse.ArgumentParser(prog="driftloop", description=__doc__, parents=[common])
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, parents=[common])
        sp.set_defaults(fn=fn)
        return sp

    w = cmd("worker", cmd_worker, "run one worker in the foreground")
    w.add_argument("name", choices=WORKERS)

    i = cmd("init", cmd_init, "scaffold a feature repo from an example (run again with another example to "
                              "combine them)")
    i.add_argument("dir", nargs="?", default=".", help="the repo folder (default: the current one)")
    i.add_argument("--example", default=None, choices=example_names(),
                   help=f"which example (default {DEFAULT_EXAMPLE})")

    ap = cmd("apply", cmd_apply, "validate the feature repo (Feast definitions and model declarations), show "
                                 "what changes, and apply it")
    ap.add_argument("--plan", action="store_true", help="show what would change; write nothing")

    ms = cmd("models", cmd_models, "list the declared models with their label rule and champion version")
    ms.add_argument("--json", action="store_true")

    pr = cmd("produce", cmd_produce, "publish each model's synthetic traffic (its declared generator)")
    pr.add_argument("--model", action="append", help="a model (repeatable; default: every model with a generator)")
    pr.add_argument("--rate", type=float, default=500.0, help="scored events per second, per model")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--count", type=int, help="scored events per model")
    g.add_argument("--duration", type=float, help="seconds")
    pr.add_argument("--seed", type=int, default=7)
    pr.add_argument("--drift-at", type=int, default=None, help="drift from the N-th scored event on")
    pr.add_argument("--drift-model", action="append",
                    help="the model(s) --drift-at applies to (repeatable; default: all produced)")

    t = cmd("tail", cmd_tail, "print records of a topic (logical name, e.g. predictions)")
    t.add_argument("topic")
    t.add_argument("--from-beginning", action="store_true")
    t.add_argument("--max", type=int, default=None, help="stop after N records")
    t.add_argument("--timeout", type=float, default=None, help="stop after N seconds")

    up = cmd("up", cmd_up, "apply the repo and start the embedded stack (broker + workers)")
    up.add_argument("--detach", "-d", action="store_true", help="return once the stack is ready")
    up.add_argument("--timeout", type=float, default=180.0)

    dn = cmd("down", cmd_down, "stop the embedded stack")
    dn.add_argument("--timeout", type=float, default=30.0)

    d = cmd("demo", cmd_demo, "run the end-to-end loop with a drift in the middle")
    d.add_argument("--rate", type=float, default=150.0, help="scored events per second, per model")
    d.add_argument("--timeout", type=float, default=900.0)
    d.add_argument("--drift-model", default=None, help="the model whose traffic drifts (default: the first by name)")

    po = cmd("promote", cmd_promote, "make a version the champion, if it passes the gate against the champion on "
                                     "the most recent labelled holdout (recorded in the alias ledger)")
    po.add_argument("model", help="a declared model's name")
    po.add_argument("version", help="the registered version")
    po.add_argument("--reason", required=True, help="why (kept in the alias ledger)")

    rb = cmd("rollback", cmd_rollback, "move a model's champion alias back to the version it replaced (artifact "
                                       "checks only; recorded in the alias ledger)")
    rb.add_argument("model", help="a declared model's name")
    rb.add_argument("--to", help="a specific version instead of the previous champion")
    rb.add_argument("--reason", default=None, help="why (kept in the alias ledger)")

    hi = cmd("history", cmd_history, "a model's retrain requests: trigger → data → run → metrics → decision → "
                                     "alias moves")
    hi.add_argument("model", help="a declared model's name")
    hi.add_argument("--json", action="store_true")

    bf = cmd("backfill", cmd_backfill, "recompute a stream feature view from bronze with Spark (Spark Connect)")
    bf.add_argument("--view", required=True, help="stream feature view name")
    bf.add_argument("--start", required=True, type=_utc, help="ISO 8601 event time, inclusive (naive = UTC)")
    bf.add_argument("--end", required=True, type=_utc, help="ISO 8601 event time, exclusive")
    bf.add_argument("--materialize", action="store_true", help="also materialize the range to the online store")
    bf.add_argument("--dry-run", action="store_true", help="compute only; write nothing")

    cs = cmd("consistency", cmd_consistency, "mismatch share: stream offline rows vs Spark recompute, online vs "
                                             "latest; exits 1 on any mismatch with --fail-on-mismatch")
    cs.add_argument("--view", action="append", help="a view (repeatable; default: every stream feature view)")
    cs.add_argument("--start", type=_utc, default=None)
    cs.add_argument("--end", type=_utc, default=None)
    cs.add_argument("--offline-only", action="store_true", help="skip the online check")
    cs.add_argument("--fail-on-mismatch", action="store_true")

    mt = cmd("maintain", cmd_maintain, "compact, checkpoint and vacuum the Delta tables (safe while writing)")
    mt.add_argument("--retention-hours", type=float, default=168.0, help="vacuum files unreferenced this long")
    mt.add_argument("--no-vacuum", action="store_true")

    stt = cmd("status", cmd_status, "one screen: broker, workers, lag, freshness, serving versions, last drift "
                                    "report and retrain; exits 1 when something is down")
    stt.add_argument("--json", action="store_true")

    us = cmd("usage", cmd_usage, "per model: training and scoring compute seconds, scored events, predictions")
    us.add_argument("--since", type=_utc, default=None, help="ISO 8601 time (naive = UTC); default: all recorded")
    us.add_argument("--model", default=None, help="one model only")
    us.add_argument("--json", action="store_true")

    b = cmd("bench", cmd_bench, "run a benchmark; the last line of output is one JSON object")
    bs = b.add_subparsers(dest="what", required=True)
    st = bs.add_parser("streams", help="streams throughput, freshness and the per-event baseline")
    st.add_argument("--events", type=int, default=200_000, help="scored events in the backlog (+20%% outcomes)")
    st.add_argument("--rate", type=float, default=5000.0, help="events/s for the freshness phase")
    st.add_argument("--fresh-seconds", type=float, default=20.0)
    st.add_argument("--baseline-events", type=int, default=5000)
    st.add_argument("--repeats", type=int, default=3, help="backlogs drained, each by a fresh worker (median)")
    en = bs.add_parser("engine", help="the streams feature engine alone, in process (no broker, no stores)")
    en.add_argument("--events", type=int, default=100_000, help="scored events in the backlog (+20%% outcomes)")
    en.add_argument("--batch", type=int, default=20_000, help="records per micro-batch")
    en.add_argument("--repeats", type=int, default=3, help="fresh engines over the backlog (median)")
    sv = bs.add_parser("serving", help="serving throughput with feature lookup, and latency at a fixed rate")
    sv.add_argument("--events", type=int, default=100_000, help="scored events in the backlog (+20%% outcomes)")
    sv.add_argument("--rate", type=float, default=10000.0, help="scored events/s for the latency phase")
    sv.add_argument("--seconds", type=float, default=20.0, help="length of the latency phase")
    sv.add_argument("--int8-tolerance", type=float, default=0.05,
                    help="the int8 run's tolerance on the reference sample (see ServingPolicy)")
    sw = bs.add_parser("swap", help="champion promotions under load; every prediction audited")
    sw.add_argument("--swaps", type=int, default=10)
    sw.add_argument("--rate", type=float, default=2000.0, help="scored events/s during the swaps")
    sw.add_argument("--every", type=float, default=2.0, help="seconds between promotions")
    on = bs.add_parser("online", help="online store read latency p50/p99 for 1 and 100 entities")
    on.add_argument("--users", type=int, default=10_000, help="entities written to the online store")
    on.add_argument("--reads", type=int, default=2000, help="timed reads per size")
    dr = bs.add_parser("drift", help="one window's drift check (cached reference) vs plain Evidently; detection, "
                       "false episodes")
    dr.add_argument("--reference-rows", type=int, default=100_000)
    dr.add_argument("--window-rows", type=int, default=10_000)
    dr.add_argument("--columns", type=int, default=20, help="half numeric, half categorical")
    dr.add_argument("--seed", type=int, default=0)
    lp = bs.add_parser("loop", help="the closed loop on the embedded stack: drift onset → new champion serving, "
                       "by phase; Ray Train's overhead over plain torch")
    lp.add_argument("--rate", type=float, default=150.0, help="scored events per second, per model")
    lp.add_argument("--timeout", type=float, default=900.0)
    lp.add_argument("--drift-model", default=None)
    lp.add_argument("--overhead-rows", type=int, default=20_000, help="training rows of the overhead comparison")
    tr = bs.add_parser("training", help="point-in-time training set: N labels × the example repo's 3 views")
    tr.add_argument("--labels", type=int, default=1_000_000)
    tr.add_argument("--rows-per-view", type=int, default=1_000_000, help="feature rows in each view's Delta table")
    tr.add_argument("--users", type=int, default=50_000)
    tr.add_argument("--baseline-labels", type=int, default=100_000,
                    help="also join this many labels on Feast's DuckDB store over Parquet (0: skip)")
    return p


STACK_FREE = ("init", "up", "down", "demo", "bench")  # commands that start or stop a stack of their own


def main(argv: list[str] | None = None) -> int:
    mp_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if mp_dir and not os.path.isdir(mp_dir):  # left over from a Feast import in a parent process
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if not debug:
        quiet_warnings()
    overrides: dict[str, object] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    if getattr(args, "repo", None):
        overrides["repo"] = Path(args.repo).expanduser().resolve()
    if debug:
        overrides["log_level"] = "DEBUG"
    try:
        settings = get_settings(**overrides)
    except ValueError as e:  # pydantic's ValidationError: a DRIFTLOOP_* variable with a bad value
        return _fail(args.cmd, " ".join(str(e).split())[:500], 2)
    setup_logging(settings.log_level, component=getattr(args, "name", None) or args.cmd)
    if args.cmd in ("produce", "tail"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.cmd not in STACK_FREE:
        settings = _settings_from_stack(settings)
    from driftloop.features.repo import RepoError  # light: Feast is imported only where it is used

    try:
        return args.fn(args, settings)
    except RepoError as e:  # the repo cannot be applied (any command that applies it first)
        return _fail(args.cmd, e.problems)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # one line for the user; the traceback with --debug
        if debug:
            raise
        return _fail(args.cmd, f"{type(e).__name__}: {' '.join(str(e).split())[:400]} (--debug shows where)")


if __name__ == "__main__":
    sys.exit(main())
