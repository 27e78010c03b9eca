"""A third model, in a domain no example covers, declared in a repo this test writes itself and run end to end
on the real stack with no driftloop code change: validated events, stream + batch + on-demand features,
predictions, labels from a labels topic, the first champion (a multiclass model, string entity key)."""

from __future__ import annotations

import textwrap
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from driftloop.app.producer import publish
from driftloop.app.supervisor import Stack
from driftloop.bench.common import total
from driftloop.core import delta
from driftloop.core.metrics import scrape
from driftloop.core.settings import Settings
from driftloop.features.repo import declarations, open_store
from driftloop.registry.versions import alias_version
from tests.helpers import read_topic, wait_for

pytestmark = pytest.mark.e2e

REPO = '''
"""Support tickets: which priority will triage give a ticket? (multiclass)"""
from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource, StreamFeatureView, ValueType
from feast.aggregation import Aggregation
from feast.data_format import DeltaFormat
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

from driftloop.core.declarations import FieldLabel, Model, RetrainPolicy, event_source

TICKET = "customer_id string, words int, channel string, attachments int"
TRIAGE = "customer_id string, ticket_id string, priority string"

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.STRING)
tickets = event_source("events.tickets", TICKET)
triage = event_source("events.triage", TRIAGE)

customer_tickets = StreamFeatureView(
    name="customer_tickets", entities=[customer], ttl=timedelta(days=1),
    source=event_source("events.tickets", TICKET, "customer_tickets"), timestamp_field="event_timestamp",
    aggregations=[Aggregation(column="words", function="count", time_window=timedelta(hours=1), name="tickets_1h"),
                  Aggregation(column="words", function="mean", time_window=timedelta(hours=1),
                              name="mean_words_1h")],
    schema=[Field(name="customer_id", dtype=String), Field(name="tickets_1h", dtype=Int64),
            Field(name="mean_words_1h", dtype=Float64)],
    online=True)

customer_profile = FeatureView(
    name="customer_profile", entities=[customer], ttl=timedelta(days=3650),
    schema=[Field(name="customer_id", dtype=String), Field(name="tier", dtype=Float64)],
    source=FileSource(name="customer_profile_source", path="customer_profile", file_format=DeltaFormat(),
                      timestamp_field="event_timestamp", created_timestamp_column="created"),
    online=True)

ticket_request = RequestSource(name="ticket_request", schema=[
    Field(name="words", dtype=Int64), Field(name="attachments", dtype=Int64), Field(name="channel", dtype=String)])


@on_demand_feature_view(sources=[ticket_request], mode="pandas", schema=[
    Field(name="words_f", dtype=Float64), Field(name="attachments_f", dtype=Float64),
    Field(name="is_email", dtype=Float64)])
def ticket_features(inputs: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"words_f": inputs["words"].astype("float64"),
                         "attachments_f": inputs["attachments"].astype("float64"),
                         "is_email": (inputs["channel"] == "email").astype("float64")}, index=inputs.index)


triage_v1 = FeatureService(name="triage_v1", features=[ticket_features, customer_tickets, customer_profile])

priority = Model(name="priority", task="multiclass", metric="accuracy", classes=["low", "normal", "urgent"],
                 source=tickets, features=triage_v1,
                 label=FieldLabel(source=triage, event_id_field="ticket_id", value_field="priority"),
                 retrain=RetrainPolicy(min_labels=1200, epochs=30))
'''
CLASSES = ["low", "normal", "urgent"]
CUSTOMERS = 40


def tickets(n: int, seed: int, tiers: np.ndarray) -> list[tuple[str, dict]]:
    """Tickets, each followed by its triage label (priority from words, attachments, channel and tier)."""
    r = np.random.default_rng(seed)
    out: list[tuple[str, dict]] = []
    now = time.time_ns() // 1000
    for i in range(n):
        c = int(r.integers(CUSTOMERS))
        words, att = int(r.integers(5, 400)), int(r.integers(0, 4))
        channel = str(r.choice(["email", "chat", "phone"]))
        urgency = words / 200 + att * 0.6 + (channel == "phone") * 1.0 + tiers[c] * 0.8 + r.normal(0, 0.3)
        prio = CLASSES[0 if urgency < 1.2 else 1 if urgency < 2.4 else 2]
        tid = f"{seed}-{i}-{uuid.uuid4().hex[:6]}"
        ts = now + i * 500
        out.append(("events.tickets", {"schema_version": 1, "event_id": tid, "ts": ts, "customer_id": f"c{c}",
                                       "words": words, "channel": channel, "attachments": att}))
        out.append(("events.triage", {"schema_version": 1, "event_id": f"t{tid}", "ts": ts + 300_000,
                                      "customer_id": f"c{c}", "ticket_id": tid, "priority": prio}))
    return out


def test_a_model_declared_outside_the_project_runs_end_to_end(tmp_path, bootstrap_servers):
    repo = tmp_path / "support_repo"
    repo.mkdir()
    (repo / "support.py").write_text(textwrap.dedent(REPO))
    s = Settings(data_dir=tmp_path / "data", bootstrap_servers=bootstrap_servers, repo=repo, partitions=2,
                 topic_prefix=f"m{uuid.uuid4().hex[:8]}.")
    tiers = np.round(np.random.default_rng(3).uniform(0, 1, CUSTOMERS), 3)
    profile = pa.table({"customer_id": [f"c{i}" for i in range(CUSTOMERS)], "tier": tiers,
                        "event_timestamp": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * CUSTOMERS,
                                                    pa.timestamp("us", tz="UTC")),
                        "created": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * CUSTOMERS,
                                            pa.timestamp("us", tz="UTC"))})
    write_deltalake(str(s.offline_dir / "customer_profile"), profile)
    stack = Stack(s)
    stack.start(timeout=240)
    try:
        decls = declarations(s)
        spec = decls.model("priority")
        assert spec.features == ["words_f", "attachments_f", "is_email", "tickets_1h", "mean_words_1h", "tier"]
        store = open_store(s)
        store.materialize(datetime(2025, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(days=1),
                          feature_views=["customer_profile"])
        first = tickets(2400, seed=1, tiers=tiers)
        bad = [("events.tickets", b"c1", b'{"schema_version": 1, "event_id": "x1", "ts": 5, "customer_id": "c1", '
                                        b'"words": "many", "channel": "chat", "attachments": 0}'),
               ("events.tickets", b"c1", b'{"schema_version": 2, "event_id": "x2", "ts": 5}')]
        publish(s, first[:2000] + bad + first[2000:], rate=3000)
        # the first champion trains itself from the labels topic once there are enough labels
        version = wait_for(lambda: alias_version(s, "priority"), 300, every=2.0)
        serving = stack.info["metrics_ports"]["serving"]  # events before it serves the champion pass unscored
        wait_for(lambda: total(scrape(serving), "driftloop_serving_model_version", model="priority") == float(version),
                 60)
        second = tickets(400, seed=2, tiers=tiers)
        publish(s, second, rate=2000)
        scored = {r["event_id"] for t, r in second if t == "events.tickets"}

        def predicted() -> dict[str, dict]:
            got = {}
            for m in read_topic(s, "predictions", 10**6, timeout=5):
                p = orjson.loads(m.value())
                if p["model_name"] == "priority" and p["event_id"] in scored:
                    got[p["event_id"]] = p
            return got if len(got) == len(scored) else {}

        preds = wait_for(predicted, 180, every=3.0)
        for p in preds.values():
            assert len(p["probabilities"]) == 3 and abs(sum(p["probabilities"]) - 1) < 1e-3
            assert p["score"] == int(np.argmax(p["probabilities"]))
            assert p["features"]["tier"] == pytest.approx(tiers[int(p["key"][1:])], abs=1e-6)  # the batch view
        # invalid events: dead-lettered with a reason naming the field
        reasons = {dict(m.headers())["reason"].decode(): dict(m.headers())["error"].decode()
                   for m in read_topic(s, "dlq", 2, timeout=30)}
        assert "'words'" in reasons["invalid"] and "schema_version" in reasons
        # labels: every triage record became the model's label (class index)
        labels = delta.read(s.offline_dir / "labels")
        labels = labels[labels["model_name"] == "priority"].drop_duplicates("event_id")
        want = {r["ticket_id"]: CLASSES.index(r["priority"]) for t, r in first + second if t == "events.triage"}
        got = dict(zip(labels["event_id"], labels["label"], strict=True))
        assert got == pytest.approx(want)
        # the stream view: the newest online count per customer equals a pandas recount of its tickets
        events = pd.DataFrame([r for t, r in first + second if t == "events.tickets"])
        online = store.get_online_features(features=["customer_tickets:tickets_1h"],
                                           entity_rows=[{"customer_id": f"c{i}"} for i in range(CUSTOMERS)]).to_df()
        events["bucket"] = events["ts"] // 3_600_000_000
        newest = events.loc[events.groupby("customer_id")["ts"].idxmax(), ["customer_id", "bucket"]]
        want_counts = {c: int(((events.customer_id == c) & (events.bucket == b)).sum()) for c, b in newest.values}
        assert dict(zip(online["customer_id"], online["tickets_1h"], strict=True)) == want_counts
    finally:
        stack.stop()
