"""The chaos loop: the demo (every example model, one drifting) while its workers are SIGKILLed at seeded random
moments and restarted by the supervisor (the drift worker carries the web app). The loop still closes for the
drifting model; every scored event has exactly one prediction per model after de-duplication by event id, from
the first champion on (events before it pass unscored: there is no model yet);
offline and online features and the labels equal the pandas reference over the events on the broker; no
retrain request is lost or doubled; each model's alias ledger is a chain without a gap."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from driftloop.app.demo import run_demo
from driftloop.core import delta
from driftloop.core.broker import free_port
from driftloop.core.contracts import RetrainRequest
from driftloop.core.declarations import Declarations, ModelSpec
from driftloop.core.requests import RequestStore
from driftloop.core.settings import Settings
from driftloop.features.repo import open_store
from driftloop.features.windows import ViewSpec
from driftloop.registry.ledger import moves
from driftloop.registry.versions import CHAMPION, alias_version
from tests.helpers import read_all, wait_committed, wait_streamed, worker
from tests.reference import expected_labels, offline_rows
from tests.test_streams_exact import _views, check_exact

pytestmark = pytest.mark.reliability

ORDER = ["streams", "serving", "drift", "retrain", "streams", "serving", "retrain"]


def _kill_some(s: Settings, done: threading.Event, rng: random.Random, kills: list[tuple[str, float]]) -> None:
    """SIGKILL the next worker of ``ORDER`` every 20-50 s once the stack is up, until the demo ends."""
    while not done.is_set() and not s.stack_file.exists():
        time.sleep(0.5)
    t0 = time.monotonic()
    for name in ORDER:
        if done.wait(rng.uniform(20, 50)):
            return
        try:
            pid = json.loads(s.stack_file.read_text())["workers"][name]
            os.killpg(pid, signal.SIGKILL)
        except (OSError, KeyError, ValueError):
            continue  # the stack is stopping, or that worker is down already
        kills.append((name, round(time.monotonic() - t0, 1)))


def _labels_match(s: Settings, m: ModelSpec, events: list[tuple[str, dict]]) -> None:
    """Every label row equals the reference, once; a scored event may lack its label only while its window is
    still open (the outcome watermark of its partition has not passed it: the demo's traffic just stopped)."""
    want = expected_labels(events, m).set_index("event_id")
    got = delta.read(s.offline_dir / "labels")
    got = got[got["model_name"] == m.name]
    assert got["event_id"].is_unique, f"{m.name}: {got['event_id'].duplicated().sum()} labels written twice"
    scored = pd.DataFrame([r for t, r in events if t == m.topic]).set_index("event_id")
    assert set(got["event_id"]) <= set(scored.index), f"{m.name}: labels of no scored event"
    with_label = got.set_index("event_id")
    both = with_label.index.intersection(want.index)
    assert np.allclose(with_label.loc[both, "label"].to_numpy(float), want.loc[both, "label"].to_numpy(float)), \
        f"{m.name}: labels differ from the reference"
    unlabelled_in_ref = set(with_label.index) - set(want.index)  # a label the reference has none for
    assert m.task == "binary" or not unlabelled_in_ref, f"{m.name}: {len(unlabelled_in_ref)} labels without an outcome"
    missing = scored.loc[list(set(want.index) - set(with_label.index))]
    last = max(r["ts"] for t, r in events if t == m.label.topic)
    open_from = last - (m.label.window_s + 60) * 1e6  # the last window plus the outcome topic's lateness, at most
    assert (missing["ts"] >= open_from).all(), \
        f"{m.name}: {(missing['ts'] < open_from).sum()} labels missing for events whose window closed"


def _records(s: Settings, decls: Declarations) -> list[tuple[str, dict]]:
    """Every record of the declared topics, in offset order per partition. A record produced twice (the demo's
    producer re-sent a request the overloaded broker had written after all: idempotence is off) counts twice in
    the features, as ``docs/producers.md`` says: its first copy keeps the event id, later ones are named
    ``<id>@<partition>:<offset>`` (as ``_offline_rows`` names them in the store)."""
    out = []
    for t in decls.topics:
        seen: set[str] = set()
        for m in read_all(s, t, timeout=300):
            rec = orjson.loads(m.value())
            if rec["event_id"] in seen:
                rec["event_id"] = f"{rec['event_id']}@{m.partition()}:{m.offset()}"
            seen.add(rec["event_id"])
            POSITION[rec["event_id"]] = (m.partition(), m.offset())
            out.append((t, rec))
    return out


POSITION: dict[str, tuple[int, int]] = {}  # event id → (partition, offset), filled by _records


def _unpredicted(m: ModelSpec, once: list[tuple[str, dict]], predicted: set[str]) -> tuple[list[str], int]:
    """Scored events of ``m`` without a prediction although an earlier event of their partition had one (a
    champion was serving: it is never unset), and how many came before the first champion (they pass
    unscored, as the serving worker logs)."""
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for t, r in once:
        if t == m.topic:
            p, o = POSITION[r["event_id"]]
            by_partition.setdefault(p, []).append((o, r["event_id"]))
    lost, before = [], 0
    for rows in by_partition.values():
        rows.sort()
        first = next((i for i, (_o, e) in enumerate(rows) if e in predicted), len(rows))
        before += first
        lost += [e for _o, e in rows[first:] if e not in predicted]
    return lost, before


def _offline_rows(s: Settings, view: ViewSpec) -> pd.DataFrame:
    """The view's rows by event id, later copies of a record produced twice named as ``_records`` names them."""
    df = offline_rows(s, view)
    later = df["_offset"] != df.groupby("event_id")["_offset"].transform("min")
    df.loc[later, "event_id"] = (df.loc[later, "event_id"] + "@" + df.loc[later, "_partition"].astype(str) + ":"
                                 + df.loc[later, "_offset"].astype(str))
    return df


def test_the_loop_closes_while_workers_are_killed(tmp_path: Path, bootstrap_servers: str, figure) -> None:
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers, partitions=2,
                 topic_prefix=f"ch{uuid.uuid4().hex[:8]}.", webhook_port=free_port())
    kills: list[tuple[str, float]] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_some, args=(s, done, random.Random(16), kills), daemon=True)
    killer.start()
    outcome: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        closed = run_demo(s, timeout=1200, outcome=outcome)
    finally:
        done.set()
        killer.join(5)
    took = time.monotonic() - t0
    assert closed, f"the loop did not close under {len(kills)} kills: {kills}"
    assert len(kills) >= 5, f"only {len(kills)} kills landed before the loop closed: {kills}"
    s = s.model_copy(update={"repo": s.root / "demo_repo"})
    decls = Declarations.load(s.declarations_file)
    store = open_store(s)
    views = _views(store)
    events = _records(s, decls)
    (s.root / "events.json").write_bytes(orjson.dumps(events))  # to re-run the checks below on a failure
    once = [(t, r) for t, r in events if "@" not in r["event_id"]]  # first copies
    with worker(s, "streams") as streams, worker(s.model_copy(update={"metrics_port": free_port()}),
                                                  "serving") as serving:  # what the demo's end left unprocessed
        wait_streamed(s, events, views, alive=streams)
        for m in decls.models.values():
            wait_committed(s, f"{s.topic_prefix}serving.{m.name}", [m.topic], alive=serving)
    check_exact(s, store, events, views, rows=_offline_rows)
    for m in decls.models.values():
        if m.label.kind == "outcome":
            _labels_match(s, m, once)  # a scored event's copies share its label
    preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", timeout=300)]
    unscored = {}
    for m in decls.models.values():
        scored = {r["event_id"] for t, r in once if t == m.topic}
        got = {p["event_id"] for p in preds if p["model_name"] == m.name}
        assert got <= scored, f"{m.name}: {len(got - scored)} predictions of no event"
        lost, unscored[m.name] = _unpredicted(m, once, got)
        assert not lost, f"{m.name}: {len(lost)} scored events without a prediction after the first champion"
    requested = {RetrainRequest.from_bytes(m.value()).request_id: RetrainRequest.from_bytes(m.value()).model_name
                 for m in read_all(s, "retrain.requests", timeout=60)}
    store_rows = {r.request_id: r for name in decls.models for r in RequestStore(s).of_model(name)}
    assert set(requested) <= set(store_rows), f"requests lost: {set(requested) - set(store_rows)}"
    for name in decls.models:
        chain = moves(s, name, CHAMPION)
        assert chain and chain[0].from_version is None, f"{name}: {chain}"
        gaps = [(a.to_version, b.from_version) for a, b in zip(chain, chain[1:], strict=False)
                if a.to_version != b.from_version]
        assert not gaps, f"{name}: the alias ledger has gaps {gaps}"
        assert alias_version(s, name, CHAMPION) == chain[-1].to_version
        promoted = [mv.request_id for mv in chain if mv.request_id]
        assert len(promoted) == len(set(promoted)), f"{name}: a request promoted twice: {promoted}"
    figure("chaos loop: workers SIGKILLed", len(kills), "kills", order=" ".join(n for n, _ in kills))
    figure("chaos loop: loop closed in", round(took), "s", drift_to_swap_s=round(
        (outcome.get("swapped_us", 0) - outcome.get("onset_us", 0)) / 1e6, 1) if outcome.get("swapped_us") else None)
    figure("chaos loop: scored events lost", 0, "events", models=len(decls.models),
           produced_twice=len(events) - len(once), before_first_champion=unscored)
    figure("chaos loop: retrain requests lost or doubled", 0, "requests", requests=len(requested))
