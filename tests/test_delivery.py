"""Delivery tracking through the real broker: on a producer shared by threads, every batch answers for its own
records only, and no thread's flush can hide another's failed delivery.

The failure injected is real and broker-side: the embedded Tansu broker acknowledges writes to deleted topics,
to partitions it does not have and beyond a topic's ``max.message.bytes``, but refuses a topic name with a space
(``INVALID_TOPIC`` in its metadata answer), so records sent there fail asynchronously, like any delivery
failure. librdkafka remembers a refused name and later raises at ``produce`` time, so each refused record gets a
name of its own.
"""

from __future__ import annotations

import random
import threading
import uuid

import orjson
import pytest
import requests
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import REGISTRY
from pydantic import PrivateAttr

from driftloop.app.producer import publish
from driftloop.bench.model_fixtures import register_bad, register_good
from driftloop.bench.serving import read_all, source_offsets
from driftloop.core.contracts import Prediction, now_us
from driftloop.core.kafka import (
    CommitErrors,
    Deliveries,
    DeliveryError,
    commit_or_warn,
    consumer_config,
    flush_or_raise,
    make_producer,
    produce_raw,
)
from driftloop.core.settings import Settings
from driftloop.core.topics import ensure_topics
from driftloop.drift.monitor import Monitor
from driftloop.examples.ads.ads_generator import synthetic_events
from driftloop.features.repo import apply, declarations, init_repo
from driftloop.registry.aliases import promote
from driftloop.registry.versions import load_reference
from driftloop.serving.worker import ModelServer
from tests.helpers import alert_webhook, read_topic, wait_for

MODEL, TOPIC = "ctr", "events.impressions"


def refused(s: Settings) -> str:
    """A fresh topic name the broker refuses."""
    return f"{s.topic_prefix}refused {uuid.uuid4().hex}"


class Refusing(Settings):
    """Settings whose logical topics named in ``refuse`` map to names the broker refuses."""

    _refuse: set[str] = PrivateAttr(default_factory=set)

    def refuse(self, *topics: str) -> None:
        self._refuse = set(topics)

    def topic(self, name: str) -> str:
        return refused(self) if name in self._refuse else super().topic(name)


def test_flush_or_raise_never_forgets_a_failure_another_thread_flushed(settings: Settings):
    producer, good = make_producer(settings), settings.topic("predictions")
    produce_raw(producer, good, b"a", b"1")  # thread A's records, one refused
    produce_raw(producer, refused(settings), b"a", b"2")
    errors: list[Exception] = []

    def thread_b() -> None:  # produces and flushes in between: its flush serves A's delivery reports
        produce_raw(producer, good, b"b", b"3")
        try:
            flush_or_raise(producer)
        except DeliveryError as e:  # producer-wide by design: A's failure is B's too
            errors.append(e)

    b = threading.Thread(target=thread_b)
    b.start()
    b.join()
    assert len(producer) == 0  # everything answered: A's failure was served by B's flush
    with pytest.raises(DeliveryError, match="Invalid topic"):
        flush_or_raise(producer)  # A's own flush must still see it (the old code had cleared it)
    assert len(errors) == 1 and "Invalid topic" in str(errors[0])


def send_refused(batch: Deliveries, settings: Settings) -> int:
    """Produce one record to a refused topic through ``batch``: 1 if it is in the batch, 0 when the client
    refused it at once (it raises to the producing thread then; librdkafka does that now and again)."""
    try:
        batch.produce(refused(settings), b"k", b"v")
        return 1
    except DeliveryError as e:
        assert isinstance(e.__cause__, KafkaException) and e.__cause__.args[0].code() == KafkaError._UNKNOWN_TOPIC
        return 0


def test_batches_on_a_shared_producer_answer_for_their_own_records(settings: Settings):
    producer, good = make_producer(settings), settings.topic("predictions")
    a = Deliveries(producer)  # thread A (this one): 290 good records and 10 refused ones mid-batch
    failing = 0
    for i in range(300):
        if i % 30 == 15:
            failing += send_refused(a, settings)
        else:
            a.produce(good, b"a", b"a%d" % i)
    assert failing, "every refused record was refused at produce time: nothing to test"
    box: dict[str, object] = {}

    def thread_b() -> None:  # 500 good records, waited for while A's records (failures too) are in flight
        b = Deliveries(producer)
        for i in range(500):
            b.produce(good, b"b", b"b%d" % i)
        try:
            box["b"] = b.wait()
            producer.flush(30)  # and a full flush, which serves A's reports here
        except DeliveryError as e:
            box["b"] = e

    t = threading.Thread(target=thread_b)
    t.start()
    t.join()
    assert box["b"] == 500, box["b"]
    assert a.answered == a.sent == 290 + failing  # B's flush served every report of A's batch, failures included
    with pytest.raises(DeliveryError, match=rf"{failing} of {a.sent} records not delivered; first: \S+refused \w+: "
                                            r".*Invalid topic"):
        a.wait()
    with pytest.raises(DeliveryError):  # a tracker's failures are never cleared
        a.wait()
    values = [m.value() for m in read_topic(settings, "predictions", 790, timeout=30)]
    sent = [b"a%d" % i for i in range(300) if i % 30 != 15] + [b"b%d" % i for i in range(500)]
    assert sorted(values) == sorted(sent)  # every acked record is on the topic


def test_concurrent_batches_raise_exactly_for_their_own_failures(settings: Settings):
    """Three threads send batches on one producer (some with refused records) while a fourth keeps flushing and
    polling it; every batch's wait raises iff the batch had failures, and names how many."""
    producer, good = make_producer(settings), settings.topic("predictions")
    stop = threading.Event()
    outcomes: list[tuple[int, int, int | str]] = []  # (refused records in the batch, its size, wait's count or error)

    def sender(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            bad = {rng.randrange(200) for _ in range(rng.choice([0, 0, 1, 3]))}
            batch, failing = Deliveries(producer), 0
            for i in range(200):
                if i in bad:
                    failing += send_refused(batch, settings)
                else:
                    batch.produce(good, b"k", b"v")
            try:
                outcomes.append((failing, batch.sent, batch.wait()))
            except DeliveryError as e:
                outcomes.append((failing, batch.sent, str(e)))

    def stealer() -> None:  # serves everyone's delivery reports, as another thread's flush would
        while not stop.is_set():
            producer.flush(0.001)
            producer.poll(0.001)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(3)]
    steal = threading.Thread(target=stealer)
    steal.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    steal.join()
    assert len(outcomes) == 45 and any(n for n, _, _ in outcomes) and any(not n for n, _, _ in outcomes)
    for n, size, got in outcomes:
        assert got == size if n == 0 else str(got).startswith(f"{n} of {size} records not delivered"), (n, got)


# --- workers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, bootstrap_servers) -> tuple[Refusing, str]:
    """The ads example applied, its topics created and a champion registered: (settings that can refuse topics,
    the champion's version)."""
    root = tmp_path_factory.mktemp("delivery")
    init_repo(root / "repo", "ads")
    s = Refusing(data_dir=root / "data", repo=root / "repo", bootstrap_servers=bootstrap_servers,
                 topic_prefix=f"d{uuid.uuid4().hex[:8]}.", partitions=2, serving_alias_poll_s=0.3,
                 serving_shadow=False)
    apply(s)
    ensure_topics(s)
    return s, promote(s, make_producer(s), MODEL, register_good(s, seed=1), reason="test").version


def committed(s: Settings) -> dict[int, int]:
    """The serving group's committed offset per partition of the scored topic (0 where none)."""
    c = Consumer(consumer_config(s, f"{s.topic_prefix}serving.{MODEL}"))
    try:
        tps = c.committed([TopicPartition(s.topic(TOPIC), p) for p in range(s.partitions)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        c.close()


def test_serving_commits_after_its_own_acks_while_a_loader_announcement_fails(stack: tuple[Refusing, str]):
    """The loading thread's ``models.rejected`` record fails on the producer the scoring loop shares: the loop
    keeps committing only what its own acks cover, and the rejection is announced once the broker takes it
    (the old slot marked the version bad before announcing it, so a failed announcement was never retried)."""
    s, v1 = stack
    decls = declarations(s)
    srv = ModelServer(s, decls, decls.model(MODEL), threading.Event())
    for t in srv.load():
        t.join()
    srv.start()
    rejects = {"model": MODEL, "check": "outputs"}
    before = REGISTRY.get_sample_value("driftloop_model_rejects_total", rejects) or 0
    backlog = [x for x in synthetic_events(6000, users=300, seed=3, start_us=now_us()) if x[0] == TOPIC]
    try:
        s.refuse("models.rejected")
        bad = register_bad(s, "nan_outputs")
        promote(s, make_producer(s), MODEL, bad, reason="test")
        sender = threading.Thread(target=publish, args=(s, backlog), kwargs={"rate": 2000})
        sender.start()  # scored by v1 while the loading thread's announcements fail
        wait_for(lambda: (REGISTRY.get_sample_value("driftloop_model_rejects_total", rejects) or 0) >= before + 2, 30)
        assert not read_all(Settings(**s.model_dump()), "models.rejected", 1, timeout=0), "it was refused"
        s.refuse()
        announced = wait_for(lambda: [orjson.loads(m.value()) for m in read_all(s, "models.rejected", 1, 0)], 30)
        assert [(r["model_name"], r["version"]) for r in announced] == [(MODEL, bad)]
        sender.join()
        offsets = source_offsets(s, TOPIC, len(backlog))
        ends: dict[int, int] = {}
        for p, o in offsets.values():
            ends[p] = max(ends.get(p, 0), o + 1)
        wait_for(lambda: all(c >= ends.get(p, 0) for p, c in committed(s).items()), 60)
    finally:
        srv.halt.set()
        srv.thread.join()
    assert srv.error is None  # the loading thread's failures never failed a batch of the scoring loop
    preds = [orjson.loads(m.value()) for m in read_all(s, "predictions", len(backlog), timeout=30)]
    done = committed(s)
    covered = {e for e, (p, o) in offsets.items() if o < done[p]}
    assert len(covered) == len(backlog) and covered <= {p["event_id"] for p in preds}
    assert {p["model_version"] for p in preds} == {v1}


def test_drift_webhook_failure_is_its_own_while_the_main_loop_reports(stack: tuple[Refusing, str]):
    """Alerts whose retrain requests the broker refuses get 503 (not 202) while the monitor's main loop publishes
    its reports on the same producer; once the broker takes it, an alert is accepted."""
    s, v1 = stack
    mon = Monitor(s)
    spec = mon.states[MODEL].spec
    rows = load_reference(s, MODEL, v1).sample(spec.drift_window * 3, replace=True, random_state=0)
    preds = [Prediction(key="u", model_name=MODEL, model_version=v1, score=float(r["score"]),
                        features={c: float(r[c]) for c in spec.features}, latency_s=0) for r in rows.to_dict("records")]
    codes: list[int] = []
    with alert_webhook(mon) as (base, auth):
        url = f"{base}/v1/alerts"

        def alerts() -> None:
            for _ in range(5):
                codes.append(requests.post(url, json={"model": MODEL}, headers=auth, timeout=30).status_code)

        s.refuse("retrain.requests")
        t = threading.Thread(target=alerts)
        t.start()
        reports = [r for p in preds if (r := mon.add(p)) is not None]  # the main loop, meanwhile
        t.join()
        s.refuse()
        ok = requests.post(url, json={"model": MODEL}, headers=auth, timeout=30)
    assert len(reports) == 3 and codes == [503] * 5 and ok.status_code == 202, (len(reports), codes, ok.text)
    published = [orjson.loads(m.value()) for m in read_all(s, "drift.reports", 3, timeout=10)]
    assert sorted(r["event_id"] for r in published) == sorted(r.event_id for r in reports)
    reqs = [orjson.loads(m.value()) for m in read_all(s, "retrain.requests", 10, timeout=0, idle_s=1)]
    assert [r["request_id"] for r in reqs if r["reason"] == "webhook"] == [ok.json()["request_id"]]


class _Refusing:
    """A consumer whose commit the broker answers with ``code`` (what librdkafka raises, as it raises it)."""

    def __init__(self, code: int):
        self.code = code

    def commit(self, **kwargs: object) -> None:
        raise KafkaException(KafkaError(self.code))


@pytest.mark.parametrize("code", [KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                                  KafkaError.REBALANCE_IN_PROGRESS])
def test_a_commit_the_group_moved_on_from_is_a_warning_not_a_crash(code: int, caplog) -> None:
    """After a broker outage longer than the session, the group has dropped the member: its commit is refused
    and the worker carries on (tests/reliability/test_broker_stall.py: serving exited here before)."""
    assert commit_or_warn(_Refusing(code), "serving.x", offsets=[]) is False
    assert "consumed again" in caplog.text


def test_any_other_commit_failure_still_raises() -> None:
    with pytest.raises(KafkaException):
        commit_or_warn(_Refusing(KafkaError._TRANSPORT), "serving.x", offsets=[])


def test_a_commit_answered_later_warns_when_the_group_moved_on_and_raises_otherwise(caplog) -> None:
    """The serving loop commits without waiting (``CommitErrors`` is its consumer's ``on_commit``): a refusal
    by a group that moved on is a warning, like ``commit_or_warn``'s; any other failure is kept until the
    scoring thread checks, and raises there."""
    errors = CommitErrors("serving.x")
    errors(None, [])
    errors(KafkaError(KafkaError._NO_OFFSET), [])
    errors(KafkaError(KafkaError.UNKNOWN_MEMBER_ID), [])
    errors.check()
    assert "consumed again" in caplog.text
    errors(KafkaError(KafkaError._TRANSPORT), [])
    with pytest.raises(KafkaException):
        errors.check()
