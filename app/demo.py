"""``driftloop demo``: the whole loop for every example model on one embedded stack, with a drift in one.

Scaffolds one feature repo from every example (``driftloop init`` of each), starts the stack, produces each
model's traffic, waits until every model's first champion serves, then switches ONE model's generator to
its drifted regime (the first model by name, or ``--drift-model``). It succeeds only when, for that model,
drift is detected → a retrain request → a Ray job → a registered version → promotion → serving swapped →
its primary metric after the swap beats the metric before it, while every other model keeps its champion
(no retrain request, no promotion after the onset).
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from driftloop.app.producer import Generator, load_generator, produce
from driftloop.app.report import ModelSection, write_report
from driftloop.app.supervisor import Stack
from driftloop.core.contracts import now_us
from driftloop.core.declarations import ModelSpec
from driftloop.core.kafka import good_messages, make_consumer
from driftloop.core.model_metrics import FUNCTIONS
from driftloop.core.settings import Settings
from driftloop.examples import names as example_names
from driftloop.features.repo import declarations, init_repo

log = logging.getLogger(__name__)

WATCHED = ["predictions", "labels", "drift.reports", "retrain.requests", "models.promoted", "models.rejected"]
STABLE_S = 25.0           # seconds of champion traffic before the drift starts
MIN_LABELLED_AFTER = 800  # labelled predictions of the new version needed to judge it


@dataclass
class Observed:
    """Everything the demo saw on the watched topics, with arrival times (epoch µs)."""

    records: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, topic: str, model: str | None = None) -> list[tuple[int, dict[str, Any]]]:
        with self.lock:
            return [x for x in self.records[topic] if model is None or x[1].get("model_name") == model]


def _observe(settings: Settings, obs: Observed, stop: threading.Event) -> None:
    c = make_consumer(settings, f"demo-observer-{time.time_ns()}", WATCHED)
    plen = len(settings.topic_prefix)
    try:
        while not stop.is_set():
            for m in good_messages(c.consume(2000, 0.2)):
                rec = orjson.loads(m.value())
                with obs.lock:
                    obs.records[m.topic()[plen:]].append((now_us(), rec))
    finally:
        c.close()


def labelled(obs: Observed, model: str) -> pd.DataFrame:
    """The model's predictions (first per scored event) with arrival time, version and label (NaN if none)."""
    preds = pd.DataFrame([{"event_id": r["event_id"], "ts": r["ts"], "arrived": t, "score": r["score"],
                           "version": r["model_version"]} for t, r in obs.of("predictions", model)])
    if preds.empty:
        return pd.DataFrame(columns=["event_id", "ts", "arrived", "score", "version", "label"])
    labels = {r["event_id"]: r["label"] for _, r in obs.of("labels", model)}
    preds = preds.drop_duplicates("event_id", keep="first")
    preds["label"] = preds["event_id"].map(labels)
    return preds


def scenario_repo(settings: Settings) -> Path:
    """One repo with every example, scaffolded afresh under the data dir."""
    repo = settings.root / "demo_repo"
    shutil.rmtree(repo, ignore_errors=True)
    for name in example_names():
        init_repo(repo, name)
    return repo


def run_demo(settings: Settings, rate: float = 300.0, timeout: float = 600.0, drift_model: str | None = None,
             outcome: dict[str, Any] | None = None) -> bool:
    """Run the demo; True when the loop closed. ``outcome`` (if given) receives the drifted model's
    timeline: ``onset_us``, ``detected_us``, ``requested_us``, ``swapped_us`` and the promotion's ``timeline``."""
    t_start = time.monotonic()
    for sub in ("offline", "mlartifacts", "run", "reports", "faust", "drift", "retrain", "ray_results"):
        shutil.rmtree(settings.root / sub, ignore_errors=True)
    for f in ("mlflow.db", "registry.db", "online.db", "online.db-wal", "online.db-shm", "declarations.json",
              "state.db", "state.db-wal", "state.db-shm"):
        (settings.root / f).unlink(missing_ok=True)
    settings = settings.model_copy(update={"repo": scenario_repo(settings)})
    print(f"[demo] data dir {settings.root}; repo {settings.repo}; starting the embedded stack ...", flush=True)
    stack = Stack(settings)
    info = stack.start()
    s = stack.s
    specs = {n: m for n, m in sorted(declarations(s).models.items()) if m.generator}
    drift_name = drift_model or next(iter(specs))
    if drift_name not in specs:
        stack.stop()
        raise ValueError(f"--drift-model {drift_name!r} is not a declared model with a generator: {sorted(specs)}")
    print(f"[demo] stack ready in {time.monotonic() - t_start:.0f}s: broker {info['bootstrap_servers']}; models "
          f"{', '.join(f'{n} ({m.task}, {m.metric})' for n, m in specs.items())}; drift goes to {drift_name}",
          flush=True)
    gens: dict[str, Generator] = {n: load_generator(s, n, seed=11 + i) for i, n in enumerate(specs)}
    obs, stop = Observed(), threading.Event()
    threads = [threading.Thread(target=_observe, args=(s, obs, stop), daemon=True),
               threading.Thread(target=produce, daemon=True, kwargs=dict(
                   settings=s, generators=list(gens.values()), rate=rate, duration=timeout,
                   should_stop=stop.is_set, progress=False))]
    for t in threads:
        t.start()
    first: dict[str, str] = {}
    onset_us: int | None = None
    new_version: str | None = None
    ok = False
    deadline = t_start + timeout
    next_progress = 0.0
    gen = gens[drift_name]
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            stack.supervise_once()  # a worker that died is restarted, as under `driftloop up`
            for n in specs:
                if n not in first and obs.of("predictions", n):
                    first[n] = obs.of("predictions", n)[0][1]["model_version"]
                    print(f"[demo] {n}: champion v{first[n]} is serving", flush=True)
            if len(first) == len(specs) and gen.drift_at is None:
                gen.drift_at = gen.produced + int(rate * STABLE_S)
                print(f"[demo] every model serves; {drift_name} drifts from scored event {gen.drift_at}", flush=True)
            if onset_us is None and gen.drifted:
                onset_us = now_us()
                print(f"[demo] drift onset: {drift_name}'s traffic and outcome model changed", flush=True)
            if onset_us and new_version is None:
                after = [r for _, r in obs.of("models.promoted", drift_name)
                         if r["timeline"].get("request", 0) >= onset_us]
                new_version = after[0]["version"] if after else None
            if new_version:
                lab = labelled(obs, drift_name)
                if lab[(lab["version"] == new_version)]["label"].notna().sum() >= MIN_LABELLED_AFTER:
                    ok = True
                    break
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 10
                phase = ("waiting for labels / first champions" if len(first) < len(specs) else
                         "stable" if onset_us is None else
                         "drifted: waiting for retrain" if new_version is None else
                         f"{drift_name} serving v{new_version}: collecting labels")
                counts = ", ".join(f"{n}: {len(obs.of('predictions', n))} predictions/"
                                   f"{len(obs.of('labels', n))} labels" for n in specs)
                print(f"[demo] {time.monotonic() - t_start:5.0f}s  {phase}: {counts}, "
                      f"{len(obs.of('drift.reports'))} drift reports, {len(obs.of('models.promoted'))} promotions",
                      flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        stack.stop()
    closed = _finish(s, specs, drift_name, obs, onset_us, new_version, ok, t_start, outcome)
    if not closed:
        _print_log_problems(s.root / "logs")
    return closed


def _print_log_problems(logs: Path, per_file: int = 25) -> None:
    """On failure, show each component's last warnings and errors (with tracebacks) on stderr."""
    for f in sorted(logs.glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()
        keep = [i for i, ln in enumerate(lines)
                if any(w in ln for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error:", "exited"))
                and "experimental feature" not in ln]
        picked: list[str] = []
        for i in keep[-per_file:]:
            picked.extend(lines[i:i + 4] if "Traceback" in lines[i] else [lines[i]])
        if picked:
            print(f"[demo] {f.name}: last warnings/errors", file=sys.stderr)
            for ln in picked[-per_file * 2:]:
                print("   " + ln[:300], file=sys.stderr)


def _metric(spec: ModelSpec, df: pd.DataFrame) -> float:
    return FUNCTIONS[spec.metric](df["label"].to_numpy(np.float64), df["score"].to_numpy(np.float64))


def _estimate_vs_realised(spec: ModelSpec, obs: Observed, onset_us: int | None) -> str | None:
    """Per version, the label-free estimate of the primary metric against the realised one over its
    stationary windows whose reports carry both (for the drifted model: its first version before the
    onset, later versions after it); None without such windows."""
    by_version: dict[str, list[dict[str, float]]] = {}
    first = None
    for _, r in obs.of("drift.reports", spec.name):
        first = first or r["model_version"]
        drifted_old = onset_us is not None and r["model_version"] == first and r["window_end_ts"] >= onset_us
        if {"estimated", "realised"} <= set(r.get("performance", {})) and not drifted_old:
            by_version.setdefault(r["model_version"], []).append(r["performance"])
    parts = []
    for v, perf in by_version.items():
        est, real = (float(np.mean([p[k] for p in perf])) for k in ("estimated", "realised"))
        parts.append(f"v{v} estimated {est:.4f} vs realised {real:.4f} ({abs(est - real) / max(abs(real), 1e-12):.1%}"
                     f" off, {len(perf)} windows)")
    return f"{spec.metric}: " + "; ".join(parts) if parts else None


def _finish(s: Settings, specs: dict[str, ModelSpec], drift_name: str, obs: Observed, onset_us: int | None,
            version: str | None, reached: bool, t_start: float, outcome: dict[str, Any] | None = None) -> bool:
    spec = specs[drift_name]
    marks = outcome if outcome is not None else {}  # the caller's (bench loop) timeline marks
    lab = labelled(obs, drift_name)
    steps: list[tuple[str, float]] = []
    summary: dict[str, Any] = {"drifted_model": drift_name}

    def rel(us: int) -> float:
        return (us - onset_us) / 1e6 if onset_us else float("nan")

    before = after = float("nan")
    if onset_us and version:
        steps.append((f"{drift_name}: drift onset", 0.0))
        det = [(t, r) for t, r in obs.of("drift.reports", drift_name)
               if r.get("breached", r["drifted"]) and r["window_end_ts"] >= onset_us]
        if det:
            marks["detected_us"] = det[0][0]
            why = ", ".join(det[0][1].get("reasons") or ["drift"])
            steps.append((f"drift detected (drift.reports: {why})", rel(det[0][0])))
        req = [(t, r) for t, r in obs.of("retrain.requests", drift_name)
               if r["reason"] in ("drift", "performance") and r["ts"] >= onset_us]
        if req:
            marks["requested_us"] = req[0][0]
            steps.append((f"retrain request (retrain.requests: {req[0][1]['reason']})", rel(req[0][0])))
        pr = next(r for _, r in obs.of("models.promoted", drift_name) if r["version"] == version)
        marks.update(onset_us=onset_us, timeline=pr["timeline"])
        for key, name in [("job_started", "Ray Train run started"), ("job_finished", "Ray Train run finished"),
                          ("registered", f"version {version} registered in MLflow"),
                          ("promoted", "alias champion moved (models.promoted)")]:
            if key in pr["timeline"]:
                steps.append((name, rel(pr["timeline"][key])))
        new = lab[lab["version"] == version]
        swap_us = int(new["arrived"].min()) if len(new) else None
        if swap_us:
            marks["swapped_us"] = swap_us
            steps.append((f"serving swapped to v{version} (first prediction)", rel(swap_us)))
        old = lab[(lab["version"] != version) & (lab["ts"] >= onset_us) & lab["label"].notna()]
        if swap_us:
            old = old[old["arrived"] < swap_us]
        old = old.tail(MIN_LABELLED_AFTER * 2)
        new_l = new[new["label"].notna()]
        if len(old) and len(new_l):
            before, after = _metric(spec, old), _metric(spec, new_l)
            steps.append((f"{spec.metric} {before:.3f} → {after:.3f}", rel(int(new_l["arrived"].max()))))
        summary.update({"previous_version": pr.get("previous_version"), "new_version": version,
                        "promotion_metrics": {k: round(v, 4) for k, v in pr["metrics"].items()}})
    better = after > before if spec.higher_is_better else after < before
    closed = bool(reached and better and len(steps) >= 8)
    untouched = {}
    for n in specs:
        if n == drift_name:
            continue
        promoted = [r["version"] for t, r in obs.of("models.promoted", n) if onset_us and t >= onset_us]
        requested = [r["reason"] for t, r in obs.of("retrain.requests", n) if onset_us and t >= onset_us]
        untouched[n] = not promoted and not requested
        summary[f"{n}_after_onset"] = "kept its champion" if untouched[n] else \
            f"retrain requests {requested}, promotions {promoted}"
    closed = closed and all(untouched.values())
    marks["closed"] = closed
    for n, m in specs.items():
        if (line := _estimate_vs_realised(m, obs, onset_us if n == drift_name else None)) is not None:
            summary[f"{n}_estimate_vs_realised"] = line
    summary.update({"loop_closed": closed, f"{spec.metric}_before_swap": round(before, 4),
                    f"{spec.metric}_after_swap": round(after, 4),
                    "wall_time_s": round(time.monotonic() - t_start, 1)})
    t0 = min((t for t, _ in obs.of("predictions")), default=now_us())
    sections = []
    for n, m in specs.items():
        ml = labelled(obs, n)
        drift = pd.DataFrame([{"t": (t - t0) / 1e6, "drift_share": r["drift_share"]}
                              for t, r in obs.of("drift.reports", n)], columns=["t", "drift_share"])
        preds = pd.DataFrame({"t": (ml["arrived"] - t0) / 1e6, "score": ml["score"],
                              "label": ml["label"].astype(float), "version": ml["version"]})
        sections.append(ModelSection(n, m.task, m.metric, preds, drift, m.drift_share_threshold,
                                     lambda df, m=m: _metric(m, df)))
    path = write_report(s.root / "reports" / "demo.html", sections, steps, summary,
                        (onset_us - t0) / 1e6 if onset_us else None)
    print("\n[demo] timeline (seconds since drift onset):")
    for name, t in steps:
        print(f"  {t:+7.1f}s  {name}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(f"[demo] report: {path}")
    print(f"[demo] {'LOOP CLOSED' if closed else 'LOOP NOT CLOSED'} in {summary['wall_time_s']}s", flush=True)
    return closed
