"""Validation of declared events (core/events.py) against a topic's schema, and driftloop's own contracts."""

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from driftloop.core.contracts import TOPICS, Label, Prediction, RetrainRequest
from driftloop.core.declarations import TopicSpec
from driftloop.core.events import MAX_RECORD_BYTES, Invalid, parse, parse_checked, parse_many

TRIP = TopicSpec(name="events.trips", key="courier_id", key_type="int", version=2,
                 fields={"courier_id": "int", "city": "string", "distance": "double", "express": "bool"})


def rec(**kw) -> dict:
    return {"schema_version": 2, "event_id": "e1", "ts": 1_700_000_000_000_000, "courier_id": 42, "city": "Oslo",
            "distance": 3.5, "express": False, **kw}


def raw(**kw) -> bytes:
    return orjson.dumps(rec(**kw))


def invalid(value: bytes | None) -> Invalid:
    with pytest.raises(Invalid) as e:
        parse(value, TRIP)
    return e.value


def test_valid_record_keeps_declared_fields_and_drops_extra_ones():
    got = parse(raw(extra="dropped", nested={"a": 1}), TRIP)
    assert got == rec()
    assert "extra" not in got


@pytest.mark.parametrize("field, value, what", [
    ("courier_id", "42", "an integer"), ("courier_id", 4.2, "an integer"), ("courier_id", True, "an integer"),
    ("distance", "far", "a number"), ("distance", True, "a number"),
    ("express", 1, "a boolean"), ("express", "yes", "a boolean"),
    ("city", 7, "a string"),
])
def test_wrong_type_names_the_field(field, value, what):
    e = invalid(raw(**{field: value}))
    assert e.reason == "invalid"
    assert repr(field) in e.detail and what in e.detail


def test_int_is_a_double_but_not_the_other_way():
    got = parse(raw(distance=3), TRIP)
    assert got["distance"] == 3.0 and isinstance(got["distance"], float)
    assert isinstance(parse(raw(courier_id=7), TRIP)["courier_id"], int)
    assert parse(raw(express=True), TRIP)["express"] is True


@pytest.mark.parametrize("field", ["courier_id", "city", "distance", "express"])
def test_missing_or_null_field(field):
    r = rec()
    del r[field]
    e = invalid(orjson.dumps(r))
    assert e.reason == "invalid" and repr(field) in e.detail and "missing" in e.detail
    assert repr(field) in invalid(raw(**{field: None})).detail


@pytest.mark.parametrize("value, reason", [
    (None, "empty"), (b"{not json", "bad_json"), (b"[1, 2]", "bad_json"),
    (b"x" * (MAX_RECORD_BYTES + 1), "oversize"),
])
def test_unreadable_records(value, reason):
    assert invalid(value).reason == reason


@pytest.mark.parametrize("version", [1, 3, None, "2", True])
def test_schema_version_must_be_the_declared_one(version):
    e = invalid(raw(schema_version=version))
    assert e.reason == "schema_version" and "events.trips" in e.detail


@pytest.mark.parametrize("kw, field", [
    (dict(event_id=""), "event_id"), (dict(event_id="x" * 65), "event_id"), (dict(event_id=5), "event_id"),
    (dict(ts=0), "ts"), (dict(ts=1.5), "ts"), (dict(ts="now"), "ts"),
])
def test_envelope(kw, field):
    e = invalid(raw(**kw))
    assert e.reason == "invalid" and repr(field) in e.detail


def test_roundtrip_keeps_every_field():
    lb = Label(model_name="eta", key="42", label=17.5, event_id="e1", ts=1_700_000_000_000_000)
    assert Label.from_bytes(lb.to_bytes()) == lb
    p = Prediction(key="u1", model_name="m", model_version="3", score=0.2, features={"a": 1.0}, latency_s=0.1)
    back = Prediction.from_bytes(p.to_bytes())
    assert back == p and len(back.event_id) == 32 and back.ts > 1_600_000_000_000_000


def test_contracts_reject_bad_values():
    with pytest.raises(ValidationError):
        Label(model_name="m", key="k", label="high")
    with pytest.raises(ValidationError, match="schema_version 2"):
        Label.model_validate({**orjson.loads(Label(model_name="m", key="k", label=1).to_bytes()),
                              "schema_version": 2})
    with pytest.raises(ValidationError):
        Label(model_name="m", key="k", label=1, extra=1)
    with pytest.raises(ValidationError):
        Prediction(key="u", model_name="m", model_version="1", score=0.5, features={}, latency_s=-1)
    r = RetrainRequest(model_name="m", reason="webhook")
    assert r.request_id and r.since_ts is None
    with pytest.raises(ValidationError):
        RetrainRequest(model_name="m", reason="because")


def test_topic_table_matches_architecture():
    assert set(TOPICS) == {"labels", "predictions", "predictions.shadow", "drift.reports", "retrain.requests",
                           "models.promoted", "models.rejected", "retrain.status", "dlq"}
    table = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text()
    assert all(f"| `{t}` |" in table for t in TOPICS)


_ANY = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False,
                 allow_infinity=False), st.text(max_size=3), st.text(min_size=1020, max_size=1030),
                 st.text(min_size=60, max_size=70), st.lists(st.integers(-5, 5), max_size=2))


@given(st.fixed_dictionaries({}, optional={k: _ANY for k in ("schema_version", "event_id", "ts", *TRIP.fields,
                                                                "extra")}),
       st.sampled_from([{}, rec(), rec(schema_version=2.0)]))
@settings(max_examples=300, deadline=None)
def test_compiled_decoder_agrees_with_the_python_checks(fields, base):
    """The fast path (a compiled decoder) gives what the Python checks give: the same row, or the same reason and
    detail."""
    value = orjson.dumps({**base, **fields})
    try:
        want: Any = parse_checked(value, TRIP)
    except Invalid as e:
        want = (e.reason, e.detail)
    try:
        got: Any = parse(value, TRIP)
    except Invalid as e:
        got = (e.reason, e.detail)
    assert got == want
    if isinstance(got, dict):
        assert all(type(got[k]) is type(want[k]) for k in want)


@given(st.lists(st.one_of(st.fixed_dictionaries({}, optional={k: _ANY for k in ("event_id", "ts", *TRIP.fields)})
                          .map(lambda f: orjson.dumps({**rec(), **f})),
                          st.sampled_from([None, b"", b"{", b"[1]", b" \n", b"\xff", b'{"a": 1} {"b": 2}',
                                           b"x" * (MAX_RECORD_BYTES + 1)])), max_size=12))
@settings(max_examples=200, deadline=None)
def test_parse_many_is_parse_of_each(values):
    """A batch parsed at once gives, record by record, what ``parse`` gives: the row, or the same reason and detail."""
    def one(v: bytes | None) -> Any:
        try:
            return parse(v, TRIP)
        except Invalid as e:
            return (e.reason, e.detail)

    assert [got if isinstance(got, dict) else (got.reason, got.detail)
            for got in parse_many(values, TRIP)] == [one(v) for v in values]
