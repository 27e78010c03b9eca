"""The live loop page of the drift worker: per declared model, where its loop stands.

Routes (on the alert webhook's server; read-only, no credentials needed, no secrets shown):

- ``GET /models``: the declared models, each with its champion.
- ``GET /models/{name}``: the model's page. It fetches ``GET /api/models/{name}`` every few seconds and
  shows the ``champion`` and ``challenger`` versions, the version the drift windows follow, the recent
  drift windows (share, breach reasons, estimated and realised performance), the current episode, retrain
  requests with their state and gate decision, and the alias history, linking to the Evidently reports
  and to the MLflow runs (the tracking server's UI when ``mlflow_tracking_uri`` is http(s)).
- ``GET /models/{name}/reports/{file}``: one of the model's Evidently HTML reports (only files in its
  reports folder).

An undeclared model is a 404 naming the declared ones. Each part of the JSON is read on its own: one that
fails (e.g. MLflow unreachable) is named in ``errors`` and the rest still shows.
"""

from __future__ import annotations

import html
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlparse
from urllib.request import url2pathname

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from mlflow.exceptions import MlflowException
from sqlalchemy import select

from driftloop.core.contracts import DriftReport, now_us
from driftloop.core.database import engine
from driftloop.core.database import requests as request_rows
from driftloop.core.requests import RequestStore, Stored
from driftloop.core.settings import Settings
from driftloop.drift.webhook import unknown_model
from driftloop.registry.ledger import moves
from driftloop.registry.versions import CHALLENGER, CHAMPION, client, lineage

if TYPE_CHECKING:
    from driftloop.drift.monitor import Monitor

log = logging.getLogger(__name__)

KEEP = 20  # drift windows, requests, alias moves and reports shown per model
REFRESH_MS = 3000  # how often the page fetches its JSON
CACHE_S = 1.0  # one model's JSON is assembled at most once per this many seconds, however many pages poll
REPORT_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.html")


def _mlflow_ui(settings: Settings) -> str | None:
    uri = settings.mlflow_tracking_uri or ""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


class LoopData:
    """Assembles one model's JSON from the monitor (in memory), the state database and MLflow."""

    def __init__(self, settings: Settings, monitor: Monitor):
        self.s, self.mon = settings, monitor
        self.ui = _mlflow_ui(settings)
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lineage: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return self.mon.models()

    def reports_dir(self, name: str) -> Path:
        return self.s.drift_dir / "reports" / name

    def report_file(self, name: str, file: str) -> Path | None:
        """The report ``file`` of model ``name``, when it is a report file inside the model's folder."""
        if name not in self.models() or not REPORT_FILE.fullmatch(file):
            return None
        folder = self.reports_dir(name).resolve()
        path = (folder / file).resolve()
        return path if path.parent == folder and path.is_file() else None

    def report_url(self, name: str, file: str) -> str:
        return f"/models/{quote(name, safe='')}/reports/{quote(file, safe='')}"

    def report_link(self, name: str, uri: str) -> dict[str, str] | None:
        """The page's link to a report the monitor named by its file URI, once it is written (None before, or
        once pruned)."""
        file = Path(url2pathname(unquote(urlparse(uri).path))).name if uri else ""
        return {"name": file, "url": self.report_url(name, file)} if self.report_file(name, file) else None

    def run_url(self, run_id: str | None) -> str | None:
        return f"{self.ui}/#/runs/{quote(run_id, safe='')}" if self.ui and run_id else None

    def version_url(self, name: str, version: str | None) -> str | None:
        if not self.ui or not version:
            return None
        return f"{self.ui}/#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"

    # --- the parts ---------------------------------------------------------------------------------------

    def alias(self, name: str, alias: str) -> dict[str, Any] | None:
        try:
            mv = client(self.s).get_model_version_by_alias(name, alias)
        except MlflowException:
            return None  # unset, or no such registered model yet
        return {"version": str(mv.version), "run_id": mv.run_id, "created_us": int(mv.creation_timestamp) * 1000,
                "run_url": self.run_url(mv.run_id), "version_url": self.version_url(name, str(mv.version))}

    def window(self, rep: DriftReport) -> dict[str, Any]:
        link = self.report_link(rep.model_name, rep.report_url)
        return {"id": rep.event_id, "version": rep.model_version, "start_ts": rep.window_start_ts,
                "end_ts": rep.window_end_ts, "rows": rep.rows, "drift_share": rep.drift_share,
                "drifted": rep.drifted, "breached": rep.breached, "reasons": rep.reasons, "episode": rep.episode,
                "episode_id": rep.episode_id, "performance": rep.performance, "report": link and link["url"]}

    def episode(self, name: str) -> dict[str, Any]:
        st = self.mon.states[name]
        spec, tracker = st.spec, st.tracker
        ep = dict(st.episode)  # replaced, not grown, by the monitor's thread: a copy is consistent
        reports = [link for uri in ep.get("reports") or [] if (link := self.report_link(name, uri))]
        return {"active": tracker.active, "id": ep.get("id"), "started_ts": ep.get("started_ts"),
                "request_id": ep.get("request_id"), "windows": ep.get("windows") or [], "reports": reports,
                "breached_run": tracker.breached_run, "healthy_run": tracker.healthy_run,
                "persist_windows": spec.drift_persist_windows, "recover_windows": spec.drift_recover_windows,
                "windows_follow": st.version, "windows_seen": st.windows_seen}

    def gate_metrics(self, name: str, version: str) -> dict[str, float]:
        """The gate's metrics from the version's lineage (cached: a version's lineage never changes)."""
        key = (name, version)
        if key not in self._lineage:
            try:
                self._lineage[key] = lineage(self.s, name, version)
            except (MlflowException, OSError) as e:
                log.debug("%s v%s: no lineage (%s)", name, version, e)
                self._lineage[key] = None
        gate = (self._lineage[key] or {}).get("gate") or {}
        return {k: v for k, v in (gate.get("metrics") or {}).items() if "." not in k and isinstance(v, int | float)}

    def request(self, row: Stored) -> dict[str, Any]:
        evaluated = next((h for h in reversed(row.history) if h["state"] == "evaluating"), None)
        detail = (evaluated or {}).get("detail") or {}
        decided = row.state in ("promoted", "rejected") or evaluated is not None
        gate = None
        if decided:
            gate = {"decision": detail.get("decision") or ("promote" if row.state == "promoted" else "reject"),
                    "summary": detail.get("gate") or "", "failed": row.checks or {},
                    "metrics": self.gate_metrics(row.model, row.version) if row.version else {}}
        evidence = row.request.get("evidence") or {}
        alert = evidence.get("alert") if isinstance(evidence.get("alert"), dict) else {}
        trigger = (evidence.get("episode_id") and f"episode {evidence['episode_id']}") or \
            (alert.get("labels") or {}).get("alertname") or ""
        return {"request_id": row.request_id, "reason": row.reason, "trigger": str(trigger)[:200],
                "state": row.state, "attempt": row.attempt, "created_us": row.created_us,
                "updated_us": row.updated_us, "version": row.version, "run_id": row.run_id,
                "run_url": self.run_url(row.run_id), "error": (row.error or "")[:500] or None, "gate": gate,
                "states": [h["state"] for h in row.history]}

    def requests(self, name: str) -> list[dict[str, Any]]:
        """The model's latest requests, newest first: the controller's rows, and the ones the monitor sent
        that the controller has not picked up yet (state ``sent``)."""
        store = RequestStore(self.s)
        with engine(self.s).connect() as c:
            ids = c.execute(select(request_rows.c.request_id).where(request_rows.c.model == name)
                            .order_by(request_rows.c.created_us.desc()).limit(KEEP)).scalars().all()
        rows = [self.request(r) for i in ids if (r := store.get(i)) is not None]
        known = {r["request_id"] for r in rows}
        oldest = min((r["created_us"] for r in rows), default=0) if len(rows) >= KEEP else 0
        episode = self.mon.states[name].episode
        for sent in self.mon.state.requests(name):
            at = int(sent["sent_at"] * 1e6)
            if sent["request_id"] not in known and at >= oldest:
                mine = sent["request_id"] == episode.get("request_id")
                rows.append({"request_id": sent["request_id"], "reason": sent["reason"],
                             "trigger": f"episode {episode.get('id')}" if mine else "",
                             "state": "sent" if sent["done_at"] is None else (sent["outcome"] or "done"),
                             "attempt": 0, "created_us": at, "updated_us": int((sent["done_at"] or 0) * 1e6) or at,
                             "version": None, "run_id": None, "run_url": None, "error": None, "gate": None,
                             "states": []})
        return sorted(rows, key=lambda r: r["created_us"], reverse=True)[:KEEP]

    def moves(self, name: str) -> list[dict[str, Any]]:
        """The latest alias moves, newest first."""
        out = []
        for m in moves(self.s, name)[-KEEP:][::-1]:
            out.append({**asdict(m), "run_url": self.run_url(m.run_id)})
        return out

    def reports(self, name: str) -> list[dict[str, Any]]:
        """The model's Evidently reports on disk, newest first."""
        found = []
        folder = self.reports_dir(name)
        for f in folder.glob("*.html") if folder.is_dir() else []:
            if not REPORT_FILE.fullmatch(f.name):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:  # pruned meanwhile
                continue
            found.append((st.st_mtime_ns, f.name, st.st_size))
        return [{"name": n, "url": self.report_url(name, n), "modified_us": t // 1000, "bytes": size}
                for t, n, size in sorted(found, reverse=True)[:KEEP]]

    # --- the whole ---------------------------------------------------------------------------------------

    def assemble(self, name: str) -> dict[str, Any]:
        spec = self.mon.decls.model(name)
        out: dict[str, Any] = {
            "model": name, "task": spec.task, "metric": spec.metric, "higher_is_better": spec.higher_is_better,
            "policy": {"drift_share_threshold": spec.drift_share_threshold,
                       "performance_tolerance": spec.performance_tolerance, "drift_window": spec.drift_window},
            "mlflow_ui": self.ui, "refresh_ms": REFRESH_MS, "generated_us": now_us(), "errors": {}}
        parts: dict[str, Callable[[], Any]] = {
            "champion": lambda: self.alias(name, CHAMPION), "challenger": lambda: self.alias(name, CHALLENGER),
            "episode": lambda: self.episode(name),
            "windows": lambda: [self.window(r) for r in self.mon.recent_reports(name)][::-1],
            "requests": lambda: self.requests(name), "moves": lambda: self.moves(name),
            "reports": lambda: self.reports(name)}
        for part, read in parts.items():
            try:
                out[part] = read()
            except Exception as e:  # noqa: BLE001 - one unreadable source must not blank the page
                log.warning("loop page of %s: %s unavailable: %s", name, part, e)
                out[part] = None
                out["errors"][part] = f"{type(e).__name__}: {str(e)[:300]}"
        return out

    def get(self, name: str) -> dict[str, Any]:
        """The model's JSON, at most ``CACHE_S`` old."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and now - hit[0] < CACHE_S:
            return hit[1]
        data = self.assemble(name)
        with self._lock:
            self._cache[name] = (now, data)
        return data


# --- HTML ------------------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.2em .6em;border-bottom:1px solid #eee;
vertical-align:top}th{font-weight:600;color:#555}.muted{color:#888}.bad{color:#b00020;font-weight:600}
.ok{color:#1b7f3b}.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;
padding:.6em 1em;min-width:12em}.card b{font-size:1.4em}code{font-size:.9em}#status{float:right}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · driftloop</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>{style}</style></head>
<body data-api="{api}" data-refresh="{refresh}">
<p><a href="/models">all models</a> <span id="status" class="muted">loading…</span></p>
<h1>{title}</h1><p id="about" class="muted"></p>
<div class="cards">
<div class="card">champion<br><b id="champion">–</b><br><span id="champion-run"></span></div>
<div class="card">challenger<br><b id="challenger">–</b><br><span id="challenger-run"></span></div>
<div class="card">windows follow<br><b id="serving">–</b><br><span id="seen" class="muted"></span></div>
<div class="card">episode<br><b id="episode-state">–</b><br><span id="episode-runs" class="muted"></span></div>
</div>
<p id="errors" class="bad"></p>
<h2>Current episode</h2><div id="episode"></div>
<h2>Recent drift windows</h2>
<table id="windows"><thead><tr><th>window end</th><th>version</th><th>rows</th><th>drift share</th>
<th>breached</th><th>estimated</th><th>realised</th><th>episode</th><th>report</th></tr></thead><tbody></tbody></table>
<h2>Retrain requests</h2>
<table id="requests"><thead><tr><th>created</th><th>request</th><th>reason</th><th>state</th><th>version</th>
<th>gate decision</th></tr></thead><tbody></tbody></table>
<h2>Alias history</h2>
<table id="moves"><thead><tr><th>when</th><th>alias</th><th>move</th><th>by</th><th>why</th><th>request</th>
<th>run</th></tr></thead><tbody></tbody></table>
<h2>Evidently reports</h2><ul id="reports"></ul>
<script nonce="{nonce}">{script}</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const api = document.body.dataset.api, every = Number(document.body.dataset.refresh) || 3000;
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function link(text, url) {
  if (!url) return el("span", text);
  const a = el("a", text);
  a.href = url;
  if (!url.startsWith("/")) { a.target = "_blank"; a.rel = "noopener"; }
  return a;
}
function when(us) {
  return us ? new Date(us / 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–";
}
function num(x) { return x === undefined || x === null ? "–" : Number(x).toPrecision(4); }
function ver(v) { return v ? "v" + v : "–"; }
function row(tbody, cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.append(c instanceof Node ? c : el("span", c));
    tr.append(td);
  }
  tbody.append(tr);
}
function fill(id, items, empty, cells) {
  const tbody = $(id).tBodies[0];
  tbody.replaceChildren();
  if (!items || !items.length) { row(tbody, [el("span", empty, "muted")]); return; }
  for (const it of items) row(tbody, cells(it));
}
function alias(name, a) {
  $(name).textContent = a ? ver(a.version) : "none";
  $(name + "-run").replaceChildren(a ? link("run " + a.run_id.slice(0, 12), a.run_url || a.version_url) : "");
  if (a && !a.run_url) $(name + "-run").title = "MLflow run " + a.run_id;
}
function perf(p, kind) {
  if (!p || p[kind] === undefined) return "–";
  const ref = p[kind + "_reference"];
  return num(p[kind]) + (ref === undefined ? "" : " (ref " + num(ref) + ")");
}
function render(d) {
  $("about").textContent = d.task + " · " + d.metric
    + (d.higher_is_better ? " (higher is better)" : " (lower is better)")
    + " · drift share threshold " + d.policy.drift_share_threshold;
  alias("champion", d.champion);
  alias("challenger", d.challenger);
  const ep = d.episode || {};
  $("serving").textContent = ver(ep.windows_follow);
  $("seen").textContent = (ep.windows_seen || 0) + " windows seen";
  $("episode-state").textContent = ep.active ? "active" : "none";
  $("episode-state").className = ep.active ? "bad" : "ok";
  $("episode-runs").textContent = "breached " + (ep.breached_run || 0) + "/" + ep.persist_windows
    + " · healthy " + (ep.healthy_run || 0) + "/" + ep.recover_windows;
  const epBox = $("episode");
  epBox.replaceChildren();
  if (ep.active) {
    epBox.append(el("p", "episode " + ep.id + " since " + when(ep.started_ts) + "; retrain request "
      + (ep.request_id || "not sent yet") + "; " + ep.windows.length + " breached windows"));
    const ul = el("ul");
    for (const r of ep.reports) { const li = el("li"); li.append(link(r.name, r.url)); ul.append(li); }
    epBox.append(ul);
  } else {
    epBox.append(el("p", "no drift episode", "muted"));
  }
  fill("windows", d.windows, "no window closed since the worker started", (w) => [
    when(w.end_ts), ver(w.version), w.rows, (100 * w.drift_share).toFixed(0) + "%",
    el("span", w.breached ? "yes: " + w.reasons.join(", ") : "no", w.breached ? "bad" : "ok"),
    perf(w.performance, "estimated"), perf(w.performance, "realised"), w.episode,
    w.report ? link("report", w.report) : "–"]);
  fill("requests", d.requests, "no retrain request", (r) => {
    const g = r.gate;
    let gate = "–";
    if (g) {
      const failed = Object.entries(g.failed || {}).map(([k, v]) => k + ": " + v).join("; ");
      const metrics = Object.entries(g.metrics || {}).map(([k, v]) => k + " " + num(v)).join(", ");
      gate = el("span", g.decision + (failed ? " (" + failed + ")" : "") + (metrics ? " · " + metrics : ""),
        g.decision === "promote" ? "ok" : "bad");
    }
    return [when(r.created_us), el("code", r.request_id.slice(0, 12)), r.reason + (r.trigger ? ": " + r.trigger : ""),
      r.state + (r.attempt ? " (attempt " + r.attempt + ")" : "") + (r.error ? ": " + r.error : ""),
      r.version ? link(ver(r.version), r.run_url) : "–", gate];
  });
  fill("moves", d.moves, "no alias move recorded", (m) => [
    when(m.at_us), m.alias, ver(m.from_version) + " → " + ver(m.to_version), m.actor, m.reason,
    m.request_id ? el("code", m.request_id.slice(0, 12)) : "–",
    m.run_id ? link(m.run_id.slice(0, 12), m.run_url) : "–"]);
  const reports = $("reports");
  reports.replaceChildren();
  for (const r of d.reports || []) {
    const li = el("li");
    li.append(link(r.name, r.url), el("span", " " + when(r.modified_us), "muted"));
    reports.append(li);
  }
  if (!(d.reports || []).length) reports.append(el("li", "no report written yet", "muted"));
  const errs = Object.entries(d.errors || {}).map(([k, v]) => k + " unavailable: " + v);
  $("errors").textContent = errs.join("; ");
}
async function refresh() {
  try {
    const r = await fetch(api, {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "muted";
  } catch (e) {
    $("status").textContent = "cannot refresh: " + e.message;
    $("status").className = "bad";
  } finally {
    setTimeout(refresh, every);
  }
}
refresh();
"""

SIMPLE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · driftloop</title><link rel="icon" href="data:,">
<style>{style}</style></head><body><h1>{title}</h1>{body}</body></html>
"""


def _headers(nonce: str | None = None) -> dict[str, str]:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return {"Content-Security-Policy": f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def _simple(title: str, body: str, code: int = 200) -> HTMLResponse:
    return HTMLResponse(SIMPLE.format(title=html.escape(title), style=STYLE, body=body), code, headers=_headers())


def _model_list(names: list[str], champions: dict[str, str | None] | None = None) -> str:
    """Links to the models' pages (with their champions, when given)."""
    if not names:
        return "<p>No model is declared.</p>"
    items = []
    for n in names:
        item = f'<li><a href="/models/{quote(n, safe="")}">{html.escape(n)}</a>'
        if champions is not None:
            v = champions.get(n)
            item += f' <span class="muted">champion {html.escape(f"v{v}" if v else "none")}</span>'
        items.append(item + "</li>")
    return f"<ul>{''.join(items)}</ul>"


def loop_router(settings: Settings, monitor: Monitor) -> APIRouter:
    """The loop pages' routes, reading ``monitor`` (in memory), the state database and MLflow."""
    data = LoopData(settings, monitor)
    router = APIRouter(include_in_schema=False)

    def missing(name: str) -> HTMLResponse:
        return _simple("unknown model", f"<p>No model {html.escape(repr(name))} is declared. Declared models:</p>"
                                        + _model_list(data.models()), 404)

    @router.get("/models")
    def index() -> HTMLResponse:
        names = data.models()
        versions = {}
        for n in names:
            try:
                versions[n] = (data.alias(n, CHAMPION) or {}).get("version")
            except Exception as e:  # noqa: BLE001 - the list shows without versions
                log.warning("loop index: champion of %s unavailable: %s", n, e)
                versions[n] = None
        return _simple("driftloop models", _model_list(names, versions))

    @router.get("/models/{name}")
    def page(name: str) -> HTMLResponse:
        if name not in data.models():
            return missing(name)
        nonce = secrets.token_urlsafe(16)
        body = PAGE.format(title=html.escape(name), style=STYLE, script=SCRIPT, nonce=nonce, refresh=REFRESH_MS,
                           api=html.escape(f"/api/models/{quote(name, safe='')}"))
        return HTMLResponse(body, headers=_headers(nonce))

    @router.get("/api/models/{name}")
    def api(name: str) -> Response:
        declared = data.models()
        if name not in declared:
            return unknown_model(name, declared).response()
        return JSONResponse(data.get(name), headers={"Cache-Control": "no-store"})

    @router.get("/models/{name}/reports/{file}")
    def report(name: str, file: str) -> Response:
        if name not in data.models():
            return missing(name)
        path = data.report_file(name, file)
        if path is None:
            return _simple("no such report", f"<p>{html.escape(name)} has no report {html.escape(repr(file))} "
                                             f'(reports are pruned). <a href="/models/{quote(name, safe="")}">'
                                             "Back to the model</a>.</p>", 404)
        return FileResponse(path, media_type="text/html; charset=utf-8",
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    return router
