"""``driftloop status``: the running stack on one screen (or one JSON object).

What it reads, each with a short timeout so the command stays fast when something is down:

- **broker**: an AdminClient metadata request (``list_topics``, 2 s);
- **workers** (from ``<data-dir>/stack.json``): up = the pid is alive (not a zombie) and its ``/metrics``
  answers (2 s); restarts as the supervisor counts them; consumer lag = the sum of its
  ``driftloop_consumer_lag`` samples;
- **freshness p99**: from the streams worker's ``driftloop_feature_freshness_seconds`` buckets, per view
  and over all views (cumulative since the worker started, interpolated within a bucket as
  Prometheus' ``histogram_quantile`` does);
- **per model**: the version serving reports (``driftloop_serving_model_version``) beside MLflow's
  ``champion`` alias; the newest record of the ``drift.reports`` topic from the last hour (and the drift
  worker's ``driftloop_drift_share`` gauge, which covers older windows); the last retrain request and
  where it stands (the state database).

Exit code: 0 all up, 1 something down (broker unreachable, a worker down, a dead supervisor), 2 no stack
runs on the data directory and no broker is configured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from driftloop.app.stackinfo import alive
from driftloop.core.metrics import Samples, bucket_quantile, scrape
from driftloop.core.settings import Settings

TIMEOUT_S = 2.0  # each network check
MLFLOW_TIMEOUT_S = 20.0  # a tracking store MLflow's own client must be asked about: importing it takes seconds
CHAMPION = "champion"  # registry.versions.CHAMPION (that module imports MLflow)
DRIFT_LOOKBACK_S = 3600.0
FRESHNESS = "driftloop_feature_freshness_seconds"
_ORDER = ["streams", "serving", "drift", "retrain"]  # how workers are listed
NO_STACK = ("no stack running on {root} and no broker configured: start one with `driftloop up -d` "
            "(or pass its --data-dir) or set DRIFTLOOP_BOOTSTRAP_SERVERS")


_quiet = logging.getLogger("driftloop.status.librdkafka")  # librdkafka's FAIL lines while a broker is down
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())


class _Background:
    """``fn(*args)`` on a daemon thread: a hung connection never holds the command (or its exit) up."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported by get()
            self.error = e

    def get(self, timeout: float) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"no answer within {timeout:g}s")
        if self.error is not None:
            raise self.error
        return self.value


def _iso(us: int | float | None) -> str | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="seconds")


def _why(e: BaseException) -> str:
    """One line saying why (a Kafka error's own text, not its repr)."""
    err = e.args[0] if e.args else None
    text = err.str() if hasattr(err, "str") else str(e)
    return (text.splitlines() or [type(e).__name__])[0][:200]




def _of(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(lb), v) for (n, lb), v in samples.items() if n == name]


def freshness_p99(samples: Samples) -> dict[str, Any]:
    """p99 freshness (seconds) per stream view and over all views, from the streams worker's buckets."""
    per_view: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    overall: dict[float, float] = defaultdict(float)
    for lb, v in _of(samples, f"{FRESHNESS}_bucket"):
        le = float(lb["le"])
        per_view[lb.get("view", "")][le] += v
        overall[le] += v
    return {"overall": bucket_quantile(0.99, overall),
            "views": {view: bucket_quantile(0.99, b) for view, b in sorted(per_view.items())}}


def _read_stack(s: Settings) -> dict[str, Any] | None:
    if not s.stack_file.exists():
        return None
    try:
        return json.loads(s.stack_file.read_text())
    except (OSError, ValueError):  # being rewritten (a restart): read it once more
        time.sleep(0.1)
        return json.loads(s.stack_file.read_text()) if s.stack_file.exists() else None


def _broker(s: Settings) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient

    ms = int(TIMEOUT_S * 1000)
    admin = AdminClient({"bootstrap.servers": s.bootstrap_servers, "socket.timeout.ms": ms,
                         "socket.connection.setup.timeout.ms": ms, "logger": _quiet})
    md = admin.list_topics(timeout=TIMEOUT_S)
    ours = {name: len(t.partitions) for name, t in md.topics.items() if name.startswith(s.topic_prefix)}
    return {"brokers": len(md.brokers), "topics": len(ours), "partitions": ours}


def _worker(pid: int | None, port: int | None) -> dict[str, Any]:
    """One worker: its process, its /metrics (and the samples, under ``_samples``)."""
    out: dict[str, Any] = {"pid": pid, "metrics_port": port, "process": alive(pid), "metrics": False,
                           "error": None, "_samples": {}}
    if not out["process"]:
        out["error"] = "process not running"
    if port:
        try:
            out["_samples"] = scrape(port, timeout=TIMEOUT_S)
            out["metrics"] = True
        except Exception as e:  # noqa: BLE001 - any failure to answer is "down"
            out["error"] = out["error"] or f"/metrics: {_why(e)}"
    return out


def _models(s: Settings) -> list[str]:
    """The declared models (what ``driftloop apply`` saved; nothing is applied here)."""
    if not s.declarations_file.exists():
        return []
    from driftloop.core.declarations import Declarations

    return sorted(Declarations.load(s.declarations_file).models)


def _state_db_exists(s: Settings) -> bool:
    url = s.state_url
    return not url.startswith("sqlite:///") or Path(url.removeprefix("sqlite:///")).exists()


def _retrains(s: Settings, models: list[str]) -> dict[str, dict[str, Any]]:
    """Each model's last retrain request (and every model that has one, declared or not)."""
    if not _state_db_exists(s):
        return {}
    from sqlalchemy import select

    from driftloop.core.database import requests
    from driftloop.core.requests import TERMINAL, RequestStore

    store = RequestStore(s)
    with store.engine.connect() as c:
        names = set(c.execute(select(requests.c.model).distinct()).scalars()) | set(models)
    out = {}
    for name in sorted(names):
        rows = store.of_model(name)
        if not rows:
            continue
        r = rows[-1]
        out[name] = {"request_id": r.request_id, "reason": r.reason, "state": r.state, "done": r.state in TERMINAL,
                     "attempt": r.attempt, "version": r.version, "error": r.error, "checks": r.checks,
                     "requested_at": _iso(r.created_us), "updated_at": _iso(r.updated_us), "requests": len(rows)}
    return out


def _champions(s: Settings, models: list[str]) -> dict[str, str | None]:
    """Each model's ``champion`` alias (at least those of ``models``). Importing MLflow alone takes 4-15 s,
    so a tracking server is asked over its REST API and a tracking database (sqlite, PostgreSQL...) is read
    with one query of MLflow's ``registered_model_aliases`` table; only other stores (``file:``) go through
    MLflow's client."""
    uri = s.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return dict.fromkeys(models)  # no model store yet (and none is created)
    if uri.startswith(("http://", "https://")):
        return {m: _champion_rest(uri, m) for m in models}
    if "://" in uri and not uri.startswith("file:"):
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import SQLAlchemyError
        from sqlalchemy.pool import NullPool

        args = {"timeout": TIMEOUT_S} if uri.startswith("sqlite") else {"connect_timeout": int(TIMEOUT_S)}
        try:
            with create_engine(uri, poolclass=NullPool, connect_args=args).connect() as c:
                found = dict(c.execute(text("SELECT name, version FROM registered_model_aliases WHERE alias = "
                                            ":alias"), {"alias": CHAMPION}).tuples().all())
            return {**dict.fromkeys(models), **{m: str(v) for m, v in found.items()}}
        except SQLAlchemyError:  # not MLflow's schema as we know it: ask MLflow
            pass
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(TIMEOUT_S)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from driftloop.registry.versions import alias_version

    return {m: alias_version(s, m, CHAMPION) for m in models}


def _champion_rest(uri: str, model: str) -> str | None:
    import httpx

    r = httpx.get(f"{uri.rstrip('/')}/api/2.0/mlflow/registered-models/alias", params={"name": model,
                  "alias": CHAMPION}, timeout=TIMEOUT_S)
    if r.status_code in (400, 404) and r.json().get("error_code") in ("RESOURCE_DOES_NOT_EXIST",
                                                                       "INVALID_PARAMETER_VALUE"):
        return None  # no such model, or no such alias
    r.raise_for_status()
    return str(r.json()["model_version"]["version"])


def _drift_reports(s: Settings, partitions: int) -> dict[str, dict[str, Any]]:
    """The newest ``drift.reports`` record of each model published in the last ``DRIFT_LOOKBACK_S``."""
    from driftloop.core.contracts import DriftReport
    from driftloop.core.kafka import read_past_reported_end

    since_ms = int((time.time() - DRIFT_LOOKBACK_S) * 1000)
    newest: dict[str, DriftReport] = {}
    for m in read_past_reported_end(s, s.topic("drift.reports"), range(partitions), idle_polls=2,
                                    timeout=TIMEOUT_S, from_time_ms=since_ms):
        try:
            rep = DriftReport.from_bytes(m.value())
        except ValueError:
            continue
        if rep.model_name not in newest or rep.ts >= newest[rep.model_name].ts:
            newest[rep.model_name] = rep
    return {name: {"at": _iso(r.ts), "version": r.model_version, "rows": r.rows, "drift_share": r.drift_share,
                   "drifted": r.drifted, "breached": r.breached, "reasons": r.reasons, "episode": r.episode,
                   "report_url": r.report_url or None} for name, r in newest.items()}


def collect(settings: Settings) -> dict[str, Any]:
    """Everything ``driftloop status`` shows, as one JSON-ready dict (``down`` lists what is down)."""
    from driftloop.app.cli import _settings_from_stack

    stack = _read_stack(settings)
    s = _settings_from_stack(settings)
    if stack is not None and not s.bootstrap_servers:  # a dead supervisor's broker may still run: check it too
        s = s.model_copy(update={"bootstrap_servers": stack.get("bootstrap_servers")})
    models = _models(s)
    down: list[str] = []
    problems: list[str] = []

    ports = (stack or {}).get("metrics_ports", {})
    pids = (stack or {}).get("workers", {})
    restarts = (stack or {}).get("restarts", {})
    names = sorted(set(ports) | set(pids), key=lambda n: (n not in _ORDER, _ORDER.index(n) if n in _ORDER else n))
    import httpx  # noqa: F401 - imported here, not on the threads, whose waits are for answers only
    import prometheus_client.parser  # noqa: F401
    broker_t = _Background(_broker, s) if s.bootstrap_servers else None
    worker_t = {n: _Background(_worker, pids.get(n), ports.get(n)) for n in names}
    champion_t = _Background(_champions, s, models)
    retrain_t = _Background(_retrains, s, models)

    broker: dict[str, Any] = {"bootstrap_servers": s.bootstrap_servers, "embedded": (stack or {}).get(
        "embedded_broker"), "up": None, "error": None}
    if broker_t is not None:
        try:
            info = broker_t.get(TIMEOUT_S + 1)
            broker |= {"up": True, "brokers": info["brokers"], "topics": info["topics"]}
        except Exception as e:  # noqa: BLE001 - unreachable, however it fails
            broker |= {"up": False, "error": _why(e)}
            down.append("broker")

    workers: dict[str, dict[str, Any]] = {}
    samples: dict[str, Samples] = {}
    for n, t in worker_t.items():
        try:
            w = t.get(2 * TIMEOUT_S + 1)  # httpx's timeout is per phase: connect, then read
        except TimeoutError as e:
            w = {"pid": pids.get(n), "metrics_port": ports.get(n), "process": alive(pids.get(n)),
                 "metrics": False, "error": f"/metrics: {e}", "_samples": {}}
        samples[n] = w.pop("_samples")
        lags = [v for _, v in _of(samples[n], "driftloop_consumer_lag")]
        beats = [v for lb, v in _of(samples[n], "driftloop_worker_heartbeat_timestamp_seconds")]
        w |= {"up": w["process"] and w["metrics"], "restarts": int(restarts.get(n, 0)),
              "lag": sum(lags) if lags else None,
              "heartbeat_age_s": round(time.time() - max(beats), 1) if beats else None}
        workers[n] = w
        if not w["up"]:
            down.append(f"worker {n}")

    supervisor = None
    if stack is not None:
        supervisor = {"pid": stack.get("supervisor_pid"), "up": alive(stack.get("supervisor_pid"))}
        if not supervisor["up"]:
            down.append("supervisor")

    serving = {lb.get("model", ""): v for lb, v in _of(samples.get("serving", {}), "driftloop_serving_model_version")}
    shares = {lb.get("model", ""): v for lb, v in _of(samples.get("drift", {}), "driftloop_drift_share")}
    drift: dict[str, dict[str, Any]] = {}
    topic = s.topic("drift.reports")
    if broker.get("up") and broker_t is not None and topic in broker_t.value["partitions"]:
        try:
            drift = _drift_reports(s, broker_t.value["partitions"][topic])
        except Exception as e:  # noqa: BLE001 - shown, not fatal
            problems.append(f"drift.reports: {_why(e)}")
    champions: dict[str, str | None] = {}
    try:
        champions = champion_t.get(MLFLOW_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001
        problems.append(f"MLflow: {_why(e)}")
    retrains: dict[str, dict[str, Any]] = {}
    try:
        retrains = retrain_t.get(5 * TIMEOUT_S)  # SQLAlchemy's import alone takes seconds on a busy machine
    except Exception as e:  # noqa: BLE001
        problems.append(f"state database: {_why(e)}")

    all_models = sorted(set(models) | set(serving) | set(drift) | set(retrains))
    return {
        "data_dir": str(settings.root),
        "stack": {"running": stack is not None, "file": str(settings.stack_file), "supervisor": supervisor},
        "broker": broker,
        "workers": workers,
        "freshness_p99_s": freshness_p99(samples.get("streams", {})),
        "models": {m: {"declared": m in models,
                       "serving_version": None if m not in serving else f"{serving[m]:g}",
                       "champion": champions.get(m),
                       "drift": drift.get(m), "drift_share_gauge": shares.get(m),
                       "retrain": retrains.get(m)} for m in all_models},
        "down": down,
        "problems": problems,
        "checked_at": _iso(time.time() * 1e6),
    }


def exit_code(status: dict[str, Any]) -> int:
    """2: no stack and no broker configured; 1: something is down; 0: all up."""
    if not status["stack"]["running"] and not status["broker"]["bootstrap_servers"]:
        return 2
    return 1 if status["down"] else 0


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    s = max(0.0, time.time() - datetime.fromisoformat(iso).timestamp())
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _num(v: float | None, fmt: str = "{:g}") -> str:
    return "-" if v is None else fmt.format(v)


def render(status: dict[str, Any]) -> Any:
    """The status as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def ok(up: bool | None, yes: str = "up", no: str = "DOWN") -> Text:
        return Text("-", style="dim") if up is None else Text(yes, style="green") if up else Text(no, style="bold red")

    b, st = status["broker"], status["stack"]
    head = Table.grid(padding=(0, 2))
    head.add_row("data dir", status["data_dir"])
    sup = st["supervisor"]
    head.add_row("stack", ok(sup["up"], f"running (supervisor pid {sup['pid']})", f"supervisor pid {sup['pid']} DEAD")
                 if sup else Text("none (no stack.json)", style="dim"))
    head.add_row("broker", Text.assemble(ok(b["up"], "reachable", "UNREACHABLE"),
                                         f"  {b['bootstrap_servers'] or 'not configured'}"
                                         + (" (embedded)" if b.get("embedded") else "")
                                         + (f"  {b['error']}" if b.get("error") else "")))
    parts: list[Any] = [head]

    if status["workers"]:
        t = Table(title="workers", title_justify="left")
        for col in ("worker", "state", "pid", "restarts", "lag", "heartbeat", "problem"):
            t.add_column(col, justify="right" if col in ("pid", "restarts", "lag") else "left")
        for n, w in status["workers"].items():
            t.add_row(n, ok(w["up"]), str(w["pid"] or "-"), str(w["restarts"]), _num(w["lag"], "{:.0f}"),
                      "-" if w["heartbeat_age_s"] is None else f"{w['heartbeat_age_s']:.0f}s ago", w["error"] or "")
        parts.append(t)

    fr = status["freshness_p99_s"]
    if fr["views"]:
        f = Table(title="feature freshness", title_justify="left")
        f.add_column("view")
        f.add_column("p99 since start", justify="right")
        for view, v in fr["views"].items():
            f.add_row(view, _num(v, "{:.3f} s"))
        f.add_row(Text("all views", style="bold"), _num(fr["overall"], "{:.3f} s"))
        parts.append(f)

    if status["models"]:
        m = Table(title="models", title_justify="left")
        for col in ("model", "serving", "champion", "last drift report", "last retrain"):
            m.add_column(col)
        for name, x in status["models"].items():
            serving = Text(f"v{x['serving_version']}" if x["serving_version"] else "-",
                           style="yellow" if x["serving_version"] != x["champion"] else "")
            d = x["drift"]
            if d:
                drift = (f"{_ago(d['at'])}: share {d['drift_share']:.2f} on v{d['version']}"
                         + (f", BREACHED ({', '.join(d['reasons'])})" if d["breached"] else "")
                         + (f", episode {d['episode']}" if d["episode"] != "none" else ""))
            elif x["drift_share_gauge"] is not None:
                drift = f"none in the last hour (share {x['drift_share_gauge']:.2f} in the gauge)"
            else:
                drift = "none in the last hour"
            r = x["retrain"]
            retrain = "-" if not r else (f"{r['state']} ({r['reason']}, {_ago(r['requested_at'])})"
                                         + (f" → v{r['version']}" if r["version"] else ""))
            m.add_row(name, serving, f"v{x['champion']}" if x["champion"] else "-", drift,
                      Text(retrain, style="red" if r and r["state"] == "failed" else ""))
        parts.append(m)

    for p in status["problems"]:
        parts.append(Text(f"note: {p}", style="yellow"))
    rc = exit_code(status)
    parts.append(Text("all up", style="bold green") if rc == 0 else
                 Text("DOWN: " + ", ".join(status["down"]), style="bold red") if rc == 1 else
                 Text(NO_STACK.format(root=status["data_dir"]), style="bold red"))
    return Group(*parts)


def cmd_status(a: argparse.Namespace, s: Settings) -> int:
    """``driftloop status [--json]``."""
    status = collect(s)
    rc = exit_code(status)
    if rc == 2:
        print(f"driftloop status: {NO_STACK.format(root=status['data_dir'])}", file=sys.stderr)
    if a.json:
        print(json.dumps(status, indent=2, default=str))
    elif rc != 2:
        from rich.console import Console

        Console().print(render(status))
    return rc
