"""``docs/producers.md`` as an outside producer reads it. Its Python example (confluent-kafka), run as written,
publishes events that a streams worker accepts, keyed as the page says; a record missing a declared field goes
to ``dlq`` with reason ``invalid`` naming the field; an undeclared field is dropped; the same example with
librdkafka's default partitioner lands too (misplaced records routed to their owner). Its claims about Debian's
kcat against the embedded broker and about the codecs the streams worker reads hold on this machine."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import aiokafka.codec
import orjson
import pytest

from driftloop.core import delta
from driftloop.core.broker import EmbeddedBroker
from driftloop.core.declarations import bronze_table
from driftloop.core.settings import Settings
from driftloop.features.windows import specs_from_feast
from tests.helpers import apply_repo, read_all, wait_streamed, worker

DOC = Path(__file__).resolve().parents[1] / "docs" / "producers.md"
TOPIC = "events.impressions"  # the example's topic (the ads example repo, the default)
KCAT = Path("/usr/bin/kcat")  # Debian's package
MURMUR2, DEFAULT = '"partitioner": "murmur2_random"', '"partitioner": "consistent_random"'


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _example() -> str:
    (source,) = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    return source


def _run_example(source: str, settings: Settings, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Execute the example as a user would, with the broker and prefix it reads from the environment; its
    producer is dropped when the test ends."""
    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("DRIFTLOOP_BOOTSTRAP_SERVERS", settings.bootstrap_servers or "")
    monkeypatch.setenv("DRIFTLOOP_TOPIC_PREFIX", settings.topic_prefix)
    ns: dict[str, Any] = {"__name__": "producers_example"}
    request.addfinalizer(ns.clear)
    exec(compile(source, str(DOC), "exec"), ns)  # noqa: S102 - the documented example, run as written
    return ns


def _impression(user: str, i: int) -> dict[str, Any]:
    return {"user_id": user, "ad_id": f"ad{i % 5}", "campaign_id": "c1", "device": ("mobile", "desktop")[i % 2],
            "country": "DE", "position": 1 + i % 3, "bid": 0.1 + i / 100}


def test_doc_example_publishes_events_the_streams_worker_accepts(settings: Settings, request: pytest.FixtureRequest):
    store, decls = apply_repo(settings)
    views = [v for v in specs_from_feast(store.list_stream_feature_views()) if v.topic == TOPIC]
    source = _example()
    assert MURMUR2 in source, "the example no longer sets the murmur2 partitioner this test swaps"
    users = [f"u{i}" for i in range(20)]
    with worker(settings, "streams") as proc:
        first = _run_example(source, settings, request)  # publishes the example's own event
        assert (first["TOPIC"], first["KEY"]) == (settings.topic(TOPIC), decls.topics[TOPIC].key)
        placed = [first["send"](_impression(u, i)) for i in range(2) for u in users]
        extra = first["send"]({**_impression("u1", 9), "note": "not declared"})
        bad = first["send"]({k: v for k, v in _impression("u2", 9).items() if k != "bid"})
        first["producer"].flush(30)
        assert not first["failed"]
        other = _run_example(source.replace(MURMUR2, DEFAULT), settings, request)  # librdkafka's default
        default = [other["send"](_impression(u, 5)) for u in users]
        other["producer"].flush(30)
        assert not other["failed"]

        sent = {orjson.loads(m.value())["event_id"]: m for m in read_all(settings, TOPIC)}
        value = {e: orjson.loads(m.value()) for e, m in sent.items()}
        own = sorted(set(sent) - {*placed, *default, extra, bad}, key=lambda e: value[e]["ts"])
        assert len(own) == 2, "each run of the example publishes its own event"
        for e, m in sent.items():
            assert m.key() == value[e]["user_id"].encode(), "keyed by the declared key field"
        murmur2, librdkafka = [*placed, extra, bad, own[0]], [*default, own[1]]
        owner = {value[e]["user_id"]: sent[e].partition() for e in murmur2}
        assert {(value[e]["user_id"], sent[e].partition()) for e in murmur2} == set(owner.items())
        moved = {e for e in librdkafka if sent[e].partition() != owner[value[e]["user_id"]]}
        assert 0 < len(moved) < len(librdkafka), "consistent_random puts some keys elsewhere than murmur2"

        accepted = {e: m for e, m in sent.items() if e != bad}
        wait_streamed(settings, [(TOPIC, value[e]) for e in accepted], views, alive=proc)

    n = settings.partitions
    bronze = delta.read(settings.offline_dir / bronze_table(TOPIC))
    assert sorted(bronze["event_id"]) == sorted(accepted), "every accepted event once in bronze, the bad one not"
    assert "note" not in bronze.columns, "undeclared fields are dropped"
    for event_id, user, partition, offset in bronze[["event_id", "user_id", "_partition", "_offset"]].itertuples(
            index=False, name=None):
        m = sent[event_id]
        source_partition = partition // n - 1 if partition >= n else partition
        assert (source_partition, offset) == (m.partition(), m.offset()), "rows keep their source position"
        assert (partition >= n) == (event_id in moved), "exactly the misplaced records are routed"
        if event_id in moved:
            assert partition % n == owner[user], "a routed record is processed by its key's owner"
    assert extra in set(bronze["event_id"])

    (dead,) = read_all(settings, "dlq")
    headers = {k: v.decode() for k, v in dead.headers()}
    assert headers["reason"] == "invalid" and "'bid'" in headers["error"], headers
    assert headers["source_topic"] == settings.topic(TOPIC) and dead.value() == sent[bad].value()


def test_doc_says_what_debian_kcat_does_against_the_embedded_broker():
    """The page's sentence on Debian's kcat must match what it does here: works, or fails with the quoted
    error."""
    if not KCAT.exists():
        pytest.skip(f"{KCAT} is missing (Debian package kcat; .ci/run installs it): the kcat claim is not checked")
    version = re.search(r"Version (\S+) .*librdkafka (\S+)", subprocess.run(
        [KCAT, "-V"], capture_output=True, text=True, timeout=30).stdout)
    assert version, "kcat -V prints no version"
    claim = re.search(r"Debian's kcat (\S+) \(librdkafka (\S+)\)\s+(works|fails)", _section("Clients and brokers"))
    assert claim, "docs/producers.md no longer says whether Debian's kcat works with the embedded broker"
    if claim.group(1, 2) != version.group(1, 2):
        pytest.skip(f"the page speaks of kcat {claim[1]} (librdkafka {claim[2]}); installed: {version[1]} "
                    f"(librdkafka {version[2]})")
    with EmbeddedBroker() as broker:
        r = subprocess.run([KCAT, "-b", broker.bootstrap_servers, "-L", "-m", "5"], capture_output=True, text=True,
                           timeout=60)
    works = r.returncode == 0 and "broker" in r.stdout
    assert claim[3] == ("works" if works else "fails"), f"kcat -L exit {r.returncode}: {r.stderr[-500:]}"
    if not works:
        quoted = re.search(r"`(ApiVersionRequest failed[^`]*)`", _section("Clients and brokers"))
        assert quoted and quoted[1] in r.stderr, f"the page quotes another error than kcat prints: {r.stderr[-500:]}"


def test_doc_names_the_codecs_the_streams_worker_reads():
    """The compression section names exactly the codecs the installed aiokafka (the streams worker's client)
    can decompress."""
    readable = {c for c in ("gzip", "lz4", "zstd", "snappy") if getattr(aiokafka.codec, f"has_{c}")()}
    claim = re.search(r"that is ([\w, ]+?) only", _section("Compression"))
    assert claim, "docs/producers.md no longer says which codecs the streams worker reads"
    assert set(re.split(r",\s*|\s+and\s+", claim[1])) == readable, f"aiokafka here reads {sorted(readable)}"
