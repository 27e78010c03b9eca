"""``driftloop demo``: the whole loop on the embedded stack, with a drift in the middle.

Starts the stack, produces traffic, waits for the first champion to serve, switches the generator to
its drifted regime, and succeeds only when drift is detected → a retrain request → a Ray job → a
registered version → promotion → serving swapped → log loss after the swap beats log loss before it.
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

from driftloop.core.contracts import now_us
from driftloop.core.kafka import good_messages, make_consumer
from driftloop.app.producer import TrafficGenerator, produce
from driftloop.app.report import write_report
from driftloop.core.settings import Settings
from driftloop.app.supervisor import Stack

log = logging.getLogger(__name__)

WATCHED = ["predictions", "labels", "drift.reports", "retrain.requests", "models.promoted", "models.rejected"]
STABLE_S = 25.0          # seconds of champion traffic before the drift starts
MIN_LABELLED_AFTER = 800  # labelled predictions of the new version needed to judge it
DEMO_SETTINGS = {"drift_window": 1000, "min_labels_first_model": 2500, "min_labels_retrain": 2500,
                 "drift_share_threshold": 0.8, "drift_persist_windows": 2,
                 "drift_cooldown_s": 60.0}


@dataclass
class Observed:
    """Everything the demo saw on the watched topics, with arrival times (epoch µs)."""

    records: dict[str, list[tuple[int, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, topic: str) -> list[tuple[int, dict[str, Any]]]:
        with self.lock:
            return list(self.records[topic])


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


def _log_loss(df: pd.DataFrame) -> float:
    s = np.clip(df["score"].to_numpy(np.float64), 1e-7, 1 - 1e-7)
    y = df["label"].to_numpy(np.float64)
    return float(-np.mean(y * np.log(s) + (1 - y) * np.log(1 - s)))


def _labelled(obs: Observed) -> pd.DataFrame:
    preds = pd.DataFrame([{"event_id": r["event_id"], "ts": r["ts"], "arrived": t, "score": r["score"],
                           "version": r["model_version"]} for t, r in obs.of("predictions")])
    if preds.empty:
        return preds
    labels = {r["impression_id"]: r["label"] for _, r in obs.of("labels")}
    preds = preds.drop_duplicates("event_id", keep="first")
    preds["label"] = preds["event_id"].map(labels)
    return preds


def run_demo(settings: Settings, rate: float = 400.0, timeout: float = 540.0) -> bool:
    t_start = time.monotonic()
    settings = settings.model_copy(update=DEMO_SETTINGS)
    for sub in ("offline", "feature_repo", "mlartifacts", "run", "reports"):
        shutil.rmtree(settings.root / sub, ignore_errors=True)
    (settings.root / "mlflow.db").unlink(missing_ok=True)
    print(f"[demo] data dir {settings.root}; starting the embedded stack ...", flush=True)
    stack = Stack(settings)
    info = stack.start()
    s = stack.s
    print(f"[demo] stack ready in {time.monotonic() - t_start:.0f}s: broker {info['bootstrap_servers']}", flush=True)

    obs, stop = Observed(), threading.Event()
    gen = TrafficGenerator(seed=11)
    threads = [threading.Thread(target=_observe, args=(s, obs, stop), daemon=True),
               threading.Thread(target=produce, daemon=True, kwargs=dict(
                   settings=s, rate=rate, duration=timeout, generator=gen, should_stop=stop.is_set,
                   progress=False))]
    for t in threads:
        t.start()
    onset_us: int | None = None
    first_version: str | None = None
    drift_version: str | None = None
    ok = False
    deadline = t_start + timeout
    next_progress = 0.0
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
            promoted = [r for _, r in obs.of("models.promoted")]
            preds = obs.of("predictions")
            if first_version is None and preds:
                first_version = preds[0][1]["model_version"]
                gen.drift_at = gen.produced + int(rate * STABLE_S)
                print(f"[demo] champion v{first_version} is serving; drift starts at impression {gen.drift_at}",
                      flush=True)
            if onset_us is None and gen.drifted:
                onset_us = now_us()
                print("[demo] drift onset: traffic and click model changed", flush=True)
            if onset_us and drift_version is None:
                after = [r for r in promoted if r["timeline"].get("request", 0) >= onset_us]
                drift_version = after[0]["version"] if after else None
            if drift_version:
                lab = _labelled(obs)
                if (lab["version"] == drift_version).sum() and \
                        lab[(lab["version"] == drift_version)]["label"].notna().sum() >= MIN_LABELLED_AFTER:
                    ok = True
                    break
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + 10
                phase = ("waiting for labels / first champion" if first_version is None else
                         "stable" if onset_us is None else
                         "drifted: waiting for retrain" if drift_version is None else
                         f"serving v{drift_version}: collecting labels")
                print(f"[demo] {time.monotonic() - t_start:5.0f}s  {phase}: {gen.produced} impressions, "
                      f"{len(preds)} predictions, {len(obs.of('labels'))} labels, "
                      f"{len(obs.of('drift.reports'))} drift reports, {len(promoted)} promotions", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        stack.stop()
    closed = _finish(s, obs, onset_us, drift_version, ok, t_start)
    if not closed:
        _print_log_problems(s.root / "logs")
    return closed


def _print_log_problems(logs: Path, per_file: int = 25) -> None:
    """On failure, show each component's last warnings and errors (with tracebacks) on stderr."""
    for f in sorted(logs.glob("*.log")):
        lines = f.read_text(errors="replace").splitlines()
        keep = [i for i, ln in enumerate(lines)
                if any(w in ln for w in ("WARNING", "ERROR", "CRITICAL", "Traceback", "Error:", "exited"))
                and "experimental features" not in ln]
        picked: list[str] = []
        for i in keep[-per_file:]:
            picked.extend(lines[i:i + 4] if "Traceback" in lines[i] else [lines[i]])
        if picked:
            print(f"[demo] {f.name}: last warnings/errors", file=sys.stderr)
            for ln in picked[-per_file * 2:]:
                print("   " + ln[:300], file=sys.stderr)


def _finish(s: Settings, obs: Observed, onset_us: int | None, version: str | None, reached: bool,
            t_start: float) -> bool:
    lab = _labelled(obs)
    reports = [(t, r) for t, r in obs.of("drift.reports")]
    requests = [(t, r) for t, r in obs.of("retrain.requests")]
    promos = [r for _, r in obs.of("models.promoted")]
    steps: list[tuple[str, float]] = []
    summary: dict[str, Any] = {"drift_threshold": s.drift_share_threshold}

    def rel(us: int) -> float:
        return (us - onset_us) / 1e6 if onset_us else float("nan")

    ll_before = ll_after = float("nan")
    if onset_us and version:
        steps.append(("drift onset", 0.0))
        det = [t for t, r in reports if r["drifted"] and r["window_end_ts"] >= onset_us]
        if det:
            steps.append(("drift detected (drift.reports)", rel(det[0])))
        req = [t for t, r in requests if r["reason"] == "drift" and r["ts"] >= onset_us]
        if req:
            steps.append(("retrain request (retrain.requests)", rel(req[0])))
        pr = next(r for r in promos if r["version"] == version)
        for key, name in [("job_started", "Ray job started"), ("job_finished", "Ray job finished"),
                          ("registered", f"version {version} registered in MLflow"),
                          ("promoted", "alias champion moved (models.promoted)")]:
            if key in pr["timeline"]:
                steps.append((name, rel(pr["timeline"][key])))
        new = lab[lab["version"] == version]
        swap_us = int(new["arrived"].min()) if len(new) else None
        if swap_us:
            steps.append((f"serving swapped to v{version} (first prediction)", rel(swap_us)))
        old = lab[(lab["version"] != version) & (lab["ts"] >= onset_us) & lab["label"].notna()]
        if swap_us:
            old = old[old["arrived"] < swap_us]
        old = old.tail(MIN_LABELLED_AFTER * 2)
        new_l = new[new["label"].notna()]
        if len(old) and len(new_l):
            ll_before, ll_after = _log_loss(old), _log_loss(new_l)
            steps.append((f"log loss {ll_before:.3f} → {ll_after:.3f}", rel(int(new_l["arrived"].max()))))
        summary.update({"previous_version": pr.get("previous_version"), "new_version": version,
                        "promotion_metrics": {k: round(v, 4) for k, v in pr["metrics"].items()}})
    closed = bool(reached and ll_after < ll_before and len(steps) >= 8)
    summary.update({"loop_closed": closed, "log_loss_before_swap": round(ll_before, 4),
                    "log_loss_after_swap": round(ll_after, 4), "predictions": len(lab),
                    "labelled_predictions": int(lab["label"].notna().sum()) if len(lab) else 0,
                    "wall_time_s": round(time.monotonic() - t_start, 1)})
    t0 = int(lab["arrived"].min()) if len(lab) else now_us()
    preds_df = pd.DataFrame({"t": (lab["arrived"] - t0) / 1e6, "score": lab["score"],
                             "label": lab["label"].astype(float), "version": lab["version"]}) if len(lab) else \
        pd.DataFrame(columns=["t", "score", "label", "version"])
    drift_df = pd.DataFrame([{"t": (t - t0) / 1e6, "drift_share": r["drift_share"]} for t, r in reports])
    path = write_report(s.root / "reports" / "demo.html", preds_df, drift_df, steps, summary,
                        (onset_us - t0) / 1e6 if onset_us else None)
    print("\n[demo] timeline (seconds since drift onset):")
    for name, t in steps:
        print(f"  {t:+7.1f}s  {name}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(f"[demo] report: {path}")
    print(f"[demo] {'LOOP CLOSED' if closed else 'LOOP NOT CLOSED'} in {summary['wall_time_s']}s", flush=True)
    return closed
