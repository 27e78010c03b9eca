"""The drift monitor: per declared model, windows of its champion's predictions against that version's
reference, performance before and after labels, episodes, and one retraining request per episode.

The worker (``drift/worker.py``) hands it every record of ``predictions``, ``labels`` and the retrain
outcomes (``models.promoted``, ``models.rejected``). Per model:

- **Windows** of one version's predictions (of events after the newest event it was trained on: a first
  champion catching up on the backlog scores in-sample events) close at the declared count, or once they
  span the declared event time with at least ``min_rows`` predictions. A window is compared column by
  column (the model's features and its score) with the version's reference sample, through reference statistics computed
  once per version (``drift/stats.py``), and its score distribution gives a label-free estimate of the
  primary metric (``drift/performance.py``); labels joined since the last window give the realised one.
- **A window breaches** the policy when its drifted-column share reaches the threshold or the estimated
  or realised metric dropped by more than the tolerance from the version's reference value: for the
  estimate, the estimate on the reference sample; for the realised metric, the version's first
  ``BASELINE_WINDOWS`` realised values live (its training holdout is reported beside: comparing with it
  would turn a train/serve gap that retraining cannot close into a retrain loop).
- **Episodes** (``drift/episodes.py``): ``persist_windows`` breaches in a row start one, ``recover_windows``
  healthy windows end it. An episode asks for one retrain, with its evidence, as soon as the model has
  no request in flight, is out of its cooldown and within its daily budget (``drift/state.py``).
- **Outputs**: ``drift.reports`` per window; an Evidently HTML report for every breached window and a
  sample of the others (written off the loop, pruned); gauges per model and column; outbound webhooks.

:meth:`Monitor.held` tells the worker which records open windows still need (it commits up to them).
Alerts arrive through the webhook (``drift/webhook.py``), which calls :meth:`Monitor.alert`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from confluent_kafka import Message

from driftloop.core.contracts import (
    DriftReport,
    Label,
    ModelPromoted,
    ModelRejected,
    Prediction,
    RetrainRequest,
    new_id,
)
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.kafka import Deliveries, make_producer
from driftloop.core.metrics import (
    DRIFT_CHECK_SECONDS,
    DRIFT_EPISODE,
    DRIFT_SCORE,
    DRIFT_SHARE,
    DRIFT_SHARE_THRESHOLD,
    DRIFT_WINDOWS,
    PERFORMANCE,
    PERFORMANCE_DROP,
    PERFORMANCE_REFERENCE,
    PERFORMANCE_TOLERANCE,
    RETRAIN_REQUESTS,
)
from driftloop.core.settings import Settings
from driftloop.drift.auth import load_or_create_token
from driftloop.drift.episodes import EpisodeTracker
from driftloop.drift.notify import Notifier
from driftloop.drift.performance import calibration, dropped, estimate, realised, relative_drop
from driftloop.drift.performance import outputs as reference_outputs  # (scores, class probabilities)
from driftloop.drift.reports import prune, write_report
from driftloop.drift.state import DriftState
from driftloop.drift.stats import ReferenceCache, ReferenceStats, check
from driftloop.features.repo import declarations
from driftloop.registry.versions import lineage, load_reference, run_metric

log = logging.getLogger(__name__)

TOPICS = ["predictions", "labels", "models.promoted", "models.rejected"]
Calibration = Callable[[np.ndarray], np.ndarray]
JOIN_KEEP = 50_000  # recent predictions per model kept to join their labels
SWITCH_AFTER = 20  # predictions of another version in a row before a model's windows follow it
BASELINE_WINDOWS = 2  # a version's first realised metrics live: the reference later ones are compared with
RECENT = 20  # drift reports kept in memory per model for the loop pages


class UnknownModel(LookupError):
    """An alert names a model that is not declared."""

    def __init__(self, name: object, declared: list[str]):
        super().__init__(f"unknown model {name!r}; declared models: {', '.join(declared) or 'none'}")
        self.declared = declared


@dataclass
class Held:
    """Rows kept in memory, with the first offset of each (topic, partition) they came from."""

    rows: list[Any] = field(default_factory=list)
    first: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, row: Any, msg: Message | None) -> None:
        self.rows.append(row)
        if msg is not None:
            self.first.setdefault((msg.topic(), msg.partition()), msg.offset())

    def take(self) -> list[Any]:
        rows, self.rows, self.first = self.rows, [], {}
        return rows


@dataclass
class Baseline:
    """A version's reference: drift statistics, the raw sample (for HTML reports), the label-free estimate of
    its metric on the sample and its training run's holdout metric."""

    stats: ReferenceStats
    sample: pd.DataFrame
    estimated: float | None
    holdout: float | None
    calibrate: Calibration | None = None  # binary: scores -> calibrated probabilities (reference labels)


@dataclass
class ModelState:
    spec: ModelSpec
    tracker: EpisodeTracker
    episode: dict[str, Any]  # id, started_ts, request_id, windows (evidence), reports
    run: list[dict[str, Any]] = field(default_factory=list)  # evidence of the current run of breached windows
    realised_first: list[float] = field(default_factory=list)  # the version's first realised metrics
    incoming: Held = field(default_factory=Held)  # predictions of another version, until it takes over
    incoming_version: str | None = None
    incoming_stale: int = 0  # predictions of the current version since the last incoming one
    window: Held = field(default_factory=Held)
    labelled: Held = field(default_factory=Held)  # (label, output) pairs of the window's version
    version: str | None = None
    windows_seen: int = 0
    last_window: str | None = None  # event id ending the last evaluated window (a replay skips it)
    scored: OrderedDict[str, tuple[str, Any]] = field(default_factory=OrderedDict)  # event id -> (version, output)

    @property
    def columns(self) -> list[str]:
        return [*self.spec.features, "score"]


def output_of(p: Prediction) -> Any:
    """What the metric functions take: binary P(1) / regression value, multiclass probabilities."""
    return p.probabilities if p.probabilities is not None else p.score


class Monitor:
    """Every declared model's windows and episodes; also the webhook's :class:`AlertSink`."""

    def __init__(self, settings: Settings, decls: Declarations | None = None, notifier: Notifier | None = None):
        self.s = settings
        self.decls = decls or declarations(settings)
        self.producer = make_producer(settings)  # shared by the main loop and the webhook's threads
        self.state = DriftState(settings.drift_dir / "state.db")
        self.cache = ReferenceCache(settings.drift_dir / "reference")
        secret = settings.notify_secret or load_or_create_token(settings)
        self.notifier = notifier or Notifier(settings.notify_urls, secret, max_attempts=settings.notify_max_attempts)
        self.baselines: dict[tuple[str, str], Baseline | None] = {}
        self.cutoffs: dict[tuple[str, str], int] = {}  # version -> the newest event time it was trained on
        self.states = {name: self._restore(spec) for name, spec in self.decls.models.items()}
        for spec in self.decls.models.values():  # the alert rules compare with these from the start
            DRIFT_SHARE_THRESHOLD.labels(model=spec.name).set(spec.drift_share_threshold)
            PERFORMANCE_TOLERANCE.labels(model=spec.name).set(spec.performance_tolerance)
        self.recent: dict[str, deque[DriftReport]] = {n: deque(maxlen=RECENT) for n in self.states}  # loop pages
        self.skipped: set[str] = set()  # undeclared models already logged
        self.requesting = threading.Lock()  # decide + publish + record, one at a time
        self.html = ThreadPoolExecutor(1, thread_name_prefix="drift-html")

    def _restore(self, spec: ModelSpec) -> ModelState:
        saved = self.state.episode(spec.name) or {}
        tracker = EpisodeTracker(spec.drift_persist_windows, spec.drift_recover_windows)
        for k in ("active", "breached_run", "healthy_run"):
            if k in saved.get("tracker", {}):
                setattr(tracker, k, saved["tracker"][k])
        st = ModelState(spec, tracker, saved.get("episode") or {}, saved.get("run") or [],
                        version=saved.get("version"), windows_seen=saved.get("windows_seen", 0),
                        last_window=saved.get("last_window"), realised_first=saved.get("realised_first") or [])
        DRIFT_EPISODE.labels(model=spec.name).set(1 if tracker.active else 0)
        return st

    def _save(self, st: ModelState) -> None:
        keep = ("episode", "run", "realised_first", "version", "windows_seen", "last_window")
        self.state.save_episode(st.spec.name, {"tracker": st.tracker.to_dict(), **{k: getattr(st, k) for k in keep}})

    def close(self) -> None:
        self.html.shutdown(wait=True, cancel_futures=True)  # the report being written finishes; queued ones not
        self.notifier.close(5.0)
        self.state.close()

    # --- the version's reference -------------------------------------------------------------------

    def baseline(self, spec: ModelSpec, version: str) -> Baseline | None:
        """The version's reference (computed once, statistics cached on disk); None without a sample."""
        key = (spec.name, version)
        if key not in self.baselines:
            try:
                sample = load_reference(self.s, spec.name, version)
                stats = self.cache.get(spec.name, version, lambda: sample, [*spec.features, "score"],
                                       methods=spec.drift_methods, categorical=spec.drift_categorical,
                                       numeric_method=spec.drift_method("numeric", len(sample)),
                                       categorical_method=spec.drift_method("categorical", len(sample)))
                cal = calibration(sample["score"], sample["label"]) if spec.task == "binary" and \
                    "label" in sample else None
                scores, probs = reference_outputs(sample, spec.task)
                est = estimate(spec.task, spec.metric, scores, probs, cal(scores) if cal else None)
                holdout = run_metric(self.s, spec.name, version, f"holdout_{spec.metric}")
                self.baselines[key] = Baseline(stats, sample, est, holdout, cal)
            except Exception as e:  # a version without a readable reference sample cannot be compared
                log.warning("%s v%s: no reference (%s); its windows are not checked", spec.name, version, e)
                self.baselines[key] = None
        return self.baselines[key]

    def trained_until(self, spec: ModelSpec, version: str) -> int:
        """The newest event time in the version's training data (its holdout's end, from its lineage); 0 when
        unknown. Events up to it are in-sample for that version: scoring them (e.g. the backlog a first
        champion catches up on) says nothing about drift since it was trained."""
        key = (spec.name, version)
        if key not in self.cutoffs:
            try:
                data = (lineage(self.s, spec.name, version) or {}).get("data") or {}
                self.cutoffs[key] = int((data.get("holdout_ts") or [0, 0])[1])
            except Exception as e:  # noqa: BLE001 - a version without lineage is judged on every event
                log.debug("%s v%s: no lineage (%s)", spec.name, version, e)
                self.cutoffs[key] = 0
        return self.cutoffs[key]

    # --- the stream ---------------------------------------------------------------------------------

    def model_state(self, name: str) -> ModelState | None:
        st = self.states.get(name)
        if st is None and name not in self.skipped:
            self.skipped.add(name)
            log.info("skipping records of %r: not a declared model (declared: %s)", name, sorted(self.states))
        return st

    def add(self, p: Prediction, msg: Message | None = None) -> DriftReport | None:
        """Route one prediction to its model's window; the report when that window closed."""
        st = self.model_state(p.model_name)
        if st is None:
            return None
        if p.ts <= self.trained_until(st.spec, p.model_version):
            return None  # in-sample for its version: not a sign of drift
        st.scored[p.event_id] = (p.model_version, output_of(p))
        if len(st.scored) > JOIN_KEEP:
            st.scored.popitem(last=False)
        if p.model_version != st.version:
            return self._incoming(st, p, msg)
        if st.incoming.rows:
            st.incoming_stale += 1
            if st.incoming_stale > SWITCH_AFTER:  # stragglers of another version, not a switch
                st.incoming.take()
        report = None
        rows = st.window.rows
        if rows and st.spec.drift_window_s is not None and len(rows) >= st.spec.drift_min_rows \
                and p.ts - rows[0].ts >= st.spec.drift_window_s * 1e6:
            report = self.evaluate(st, st.window.take())  # closed by time; p opens the next window
        st.window.add(p, msg)
        if len(st.window.rows) >= st.spec.drift_window:
            report = self.evaluate(st, st.window.take()) or report
        return report

    def _incoming(self, st: ModelState, p: Prediction, msg: Message | None) -> DriftReport | None:
        """A prediction of another version: the model switches to it once ``SWITCH_AFTER`` of them arrived
        (during a hot swap both versions' predictions interleave across partitions for a moment)."""
        if st.incoming_version != p.model_version:
            st.incoming.take()
            st.incoming_version = p.model_version
        st.incoming.add(p, msg)
        st.incoming_stale = 0
        if st.version is not None and len(st.incoming.rows) < SWITCH_AFTER:
            return None
        self._new_version(st, p.model_version)
        st.window, st.incoming, st.incoming_version = st.incoming, Held(), None
        if len(st.window.rows) >= st.spec.drift_window:
            return self.evaluate(st, st.window.take())
        return None

    def add_label(self, lab: Label, msg: Message | None = None) -> None:
        """Join a label to its prediction (when still known) for the realised metric."""
        st = self.model_state(lab.model_name)
        if st is None or (hit := st.scored.get(lab.event_id)) is None or hit[0] != st.version:
            return
        st.labelled.add((lab.label, hit[1]), msg)

    def _new_version(self, st: ModelState, version: str) -> None:
        """A new champion: its own reference, its own windows; an open episode ends with the old version."""
        if st.version is not None:
            log.info("%s: now v%s (was v%s); windows start again", st.spec.name, version, st.version)
        st.window.take()
        st.labelled.take()
        if st.tracker.active:
            self._end_episode(st, "new version")
        st.tracker.reset()
        st.version, st.realised_first = version, []
        self._save(st)

    def evaluate(self, st: ModelState, win: list[Prediction]) -> DriftReport | None:
        spec, version = st.spec, win[0].model_version
        if win[-1].event_id == st.last_window:
            return None  # evaluated before a restart: its report and request are out already
        base = self.baseline(spec, version)
        if base is None:
            return None
        t0 = time.perf_counter()
        cur = pd.DataFrame([{**p.features, "score": p.score} for p in win])
        result = check(base.stats, cur)
        perf, reasons = self._performance(st, base, win), []
        DRIFT_CHECK_SECONDS.labels(model=spec.name).observe(time.perf_counter() - t0)
        if result.share >= spec.drift_share_threshold:
            reasons.append("drift")
        for kind in ("estimated", "realised"):
            if kind in perf and perf.get(f"{kind}_reference") is not None and dropped(
                    perf[kind], perf[f"{kind}_reference"], spec.higher_is_better, spec.performance_tolerance):
                reasons.append(kind)
        transition = st.tracker.step(bool(reasons))
        if transition == "start":  # the episode starts with the first window of the breached run
            st.episode = {"id": new_id(), "started_ts": st.run[0]["start_ts"] if st.run else win[0].ts,
                          "request_id": None, "windows": list(st.run), "reports": []}
        in_episode = st.tracker.active or transition == "end"
        report_path = self._html(st, base, cur, bool(reasons))
        rep = DriftReport(model_name=spec.name, model_version=version, window_start_ts=win[0].ts,
                          window_end_ts=win[-1].ts, rows=len(win), drift_share=result.share,
                          drifted=result.share >= spec.drift_share_threshold, columns=result.columns,
                          performance=perf, breached=bool(reasons), reasons=reasons,
                          episode={"start": "started", "end": "ended"}.get(transition or "",
                                                                         "ongoing" if st.tracker.active else "none"),
                          episode_id=st.episode.get("id") if in_episode else None,
                          report_url=report_path.as_uri() if report_path else "")
        self._gauges(spec, result, perf, bool(reasons))
        self.recent[spec.name].append(rep)
        out = Deliveries(self.producer)
        out.event(self.s, "drift.reports", rep, spec.name)
        out.wait()
        st.windows_seen += 1
        st.last_window = win[-1].event_id
        log.info("%s window v%s: drift share %.2f%s%s", spec.name, version, result.share,
                 f" BREACH ({', '.join(reasons)})" if reasons else "", f" episode {transition}" if transition else "")
        evidence = {"report_id": rep.event_id, "start_ts": rep.window_start_ts, "end_ts": rep.window_end_ts,
                    "drift_share": result.share, "reasons": reasons}
        st.run = [*st.run[-9:], evidence] if reasons else []
        if st.tracker.active:
            st.episode["windows"] = [*st.episode["windows"][-9:], evidence]
            if report_path:
                st.episode["reports"] = [*st.episode["reports"][-9:], rep.report_url]
            if transition == "start":
                self.notifier.send("drift.detected", {"model": spec.name, "version": version, "episode_id":
                                                      st.episode["id"], "report_id": rep.event_id, "reasons": reasons})
            if st.episode.get("request_id") is None:
                self._episode_request(st, rep)
        elif transition == "end":
            self._end_episode(st, "recovered")
        self._save(st)
        return rep

    def _performance(self, st: ModelState, base: Baseline, win: list[Prediction]) -> dict[str, float]:
        spec, perf = st.spec, {}
        probs = np.asarray([p.probabilities for p in win], np.float64) if spec.task == "multiclass" else None
        scores = np.asarray([p.score for p in win], np.float64)
        est = estimate(spec.task, spec.metric, scores, probs, base.calibrate(scores) if base.calibrate else None)
        if est is not None:
            perf["estimated"] = est
            if base.estimated is not None:
                perf["estimated_reference"] = base.estimated
        if base.holdout is not None:
            perf["realised_holdout"] = base.holdout
        if len(st.labelled.rows) >= spec.drift_min_rows:
            pairs = st.labelled.take()
            labels, outs = (np.asarray(v, np.float64) for v in zip(*pairs, strict=True))
            value = realised(spec.task, spec.metric, labels, outs)
            perf["realised"], perf["realised_rows"] = value, float(len(pairs))
            if len(st.realised_first) >= BASELINE_WINDOWS:
                perf["realised_reference"] = float(np.mean(st.realised_first))
            elif np.isfinite(value):
                st.realised_first.append(value)
        return {k: float(v) for k, v in perf.items() if v is not None and np.isfinite(v)}

    def _gauges(self, spec: ModelSpec, result: Any, perf: dict[str, float], breached: bool) -> None:
        DRIFT_SHARE.labels(model=spec.name).set(result.share)
        DRIFT_WINDOWS.labels(model=spec.name, breached=str(breached).lower()).inc()
        for col, v in result.columns.items():
            DRIFT_SCORE.labels(model=spec.name, column=col, method=v["method"]).set(v["score"])
        for kind in ("estimated", "realised"):
            if kind in perf:
                PERFORMANCE.labels(model=spec.name, metric=spec.metric, kind=kind).set(perf[kind])
            ref = perf.get(f"{kind}_reference")
            if kind in perf and ref is not None:
                PERFORMANCE_REFERENCE.labels(model=spec.name, metric=spec.metric, kind=kind).set(ref)
                PERFORMANCE_DROP.labels(model=spec.name, kind=kind).set(
                    relative_drop(perf[kind], ref, spec.higher_is_better))
        DRIFT_EPISODE.labels(model=spec.name).set(1 if self.states[spec.name].tracker.active else 0)

    def _html(self, st: ModelState, base: Baseline, cur: pd.DataFrame, breached: bool):
        """Queue the window's Evidently HTML report (every breached window, one in ``drift_report_every``
        others); its path, or None."""
        if not breached and st.windows_seen % self.s.drift_report_every:
            return None
        folder = self.s.drift_dir / "reports" / st.spec.name
        path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-v{st.version}-w{st.windows_seen}.html"
        cols = [c for c in st.columns if c in base.sample]

        def write() -> None:
            try:
                write_report(base.sample, cur, cols, path, stats=base.stats, drift_share=st.spec.drift_share_threshold)
                prune(folder, self.s.drift_report_keep)
            except Exception:
                log.exception("%s: HTML drift report %s failed", st.spec.name, path.name)

        self.html.submit(write)
        return path

    # --- requests ------------------------------------------------------------------------------------

    def _episode_request(self, st: ModelState, rep: DriftReport) -> None:
        """The episode's one request, once the model is free to ask (else the next breached window tries)."""
        spec = st.spec
        reason = "drift" if "drift" in rep.reasons else "performance"
        evidence = {"episode_id": st.episode["id"], "windows": st.episode["windows"], "columns": rep.columns,
                    "performance": rep.performance, "reports": st.episode["reports"], "version": rep.model_version}
        rid, status = self.request(spec.name, reason, evidence, since_ts=st.episode["started_ts"],
                                   cooldown_s=spec.retrain_cooldown_s)
        if status in ("accepted", "in_flight"):  # in flight: the episode's drop is already being retrained for
            st.episode["request_id"] = rid
            if status == "in_flight":
                log.info("%s: episode %s joins request %s, already in flight", spec.name, st.episode["id"], rid)
        else:
            log.info("%s: episode %s waits to ask for a retrain (%s)", spec.name, st.episode["id"], status)

    def _end_episode(self, st: ModelState, why: str) -> None:
        log.info("%s: drift episode %s ended (%s)", st.spec.name, st.episode.get("id"), why)
        st.tracker.reset()
        st.episode = {}
        DRIFT_EPISODE.labels(model=st.spec.name).set(0)

    def request(self, name: str, reason: str, evidence: dict[str, Any], *, since_ts: int | None = None,
                key: str | None = None, cooldown_s: float | None = None) -> tuple[str, str]:
        """Ask for a retrain of ``name`` unless ``key`` was seen, one is in flight, or the cooldown or the
        daily budget forbids it: (request id or "", "accepted" | "duplicate" | "in_flight" | "cooldown" |
        "over_budget"). Raises DeliveryError when the broker did not acknowledge the request."""
        spec = self.decls.model(name)
        with self.requesting:
            now = time.time()
            decision, rid = self.state.decide(name, key, now, cooldown_s=cooldown_s,
                                              budget_per_day=spec.retrain_budget_per_day)
            if decision != "go":
                return rid or "", decision
            req = RetrainRequest(model_name=name, reason=reason, evidence=evidence,  # type: ignore[arg-type]
                                 since_ts=since_ts)
            out = Deliveries(self.producer)
            out.event(self.s, "retrain.requests", req, name)
            out.wait()
            self.state.record(req.request_id, name, reason, key, now)
        RETRAIN_REQUESTS.labels(model=name, reason=reason).inc()
        self.notifier.send("retrain.requested", {"model": name, "request_id": req.request_id, "reason": reason,
                                                 "evidence": evidence})
        log.info("%s: retrain request %s (%s)", name, req.request_id, reason)
        return req.request_id, "accepted"

    def on_outcome(self, ev: ModelPromoted | ModelRejected) -> None:
        """A retrain outcome: its request is no longer in flight; tell the outbound webhooks."""
        if ev.request_id:
            self.state.done(ev.request_id, "promoted" if isinstance(ev, ModelPromoted) else "rejected", time.time())
        if isinstance(ev, ModelPromoted):
            event = "model.rolled_back" if ev.reason == "rollback" else "model.promoted"
        else:
            event = "model.rejected"
        self.notifier.send(event, ev.model_dump())

    # --- the webhook's AlertSink ---------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self.states)

    def recent_reports(self, name: str) -> list[DriftReport]:
        """The model's last drift reports since this worker started, oldest first ([] for an unknown model);
        safe from the web app's threads."""
        return list(self.recent.get(name, ()))

    def alert(self, model: str, reason: str, evidence: dict[str, Any], key: str | None) -> tuple[str, str]:
        """An authenticated alert: a ``webhook`` request (no cooldown; in-flight, dedupe and budget apply)."""
        if model not in self.states:
            raise UnknownModel(model, self.models())
        rid, status = self.request(model, "webhook", {"reason": reason, **evidence}, key=key)
        st = self.states[model]
        if rid and st.tracker.active and st.episode and st.episode.get("request_id") is None:
            st.episode["request_id"] = rid  # the open episode asks no second time for the same drop
        return rid, status

    # --- offsets -------------------------------------------------------------------------------------

    def held(self) -> dict[tuple[str, int], int]:
        """The first offset per (topic, partition) that an open window or label buffer still needs."""
        out: dict[tuple[str, int], int] = {}
        for st in self.states.values():
            for h in (st.window, st.labelled, st.incoming):
                for tp, off in h.first.items():
                    out[tp] = min(off, out.get(tp, off))
        return out
