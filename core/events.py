"""Validation of raw event records against their topic's declared schema (one schema per topic).

Every event is a JSON object with the envelope ``event_id`` (1-64 chars), ``ts`` (event time, UTC epoch
microseconds) and ``schema_version`` (the declared version), plus the declared fields, each required and
of its declared type. Fields not declared are dropped. Anything else raises :class:`Invalid` with a
reason for the dead-letter topic and a detail that names the field.

Each schema is compiled once into a msgspec decoder that parses and validates a valid event in one C pass;
a record it refuses is parsed again by the Python checks below, which give the reason and detail (and
accept what the schema's rules accept that the decoder does not, such as ``schema_version`` 2.0). The one
difference: an undeclared field is skipped unread, so a number out of a double's range there is not
``bad_json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypedDict

import msgspec
import orjson

from driftloop.core.declarations import ENVELOPE, TopicSpec

MAX_RECORD_BYTES = 64 * 1024

_CHECKS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "string": (str, "a string"),
    "double": ((int, float), "a number"),
    "int": (int, "an integer"),
    "bool": (bool, "a boolean"),
}


class Invalid(Exception):
    """A record that cannot be processed; ``reason`` is a short code, ``detail`` the message."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _describe(v: Any) -> str:
    text = orjson.dumps(v).decode()
    return text if len(text) <= 40 else text[:37] + "..."


# the JSON type each declared kind takes as it is (orjson gives exactly these): no conversion, one check
_EXACT: dict[str, type] = {"string": str, "double": float, "int": int, "bool": bool}
MAX_STRING = 1024


_TYPES: dict[str, Any] = {"string": Annotated[str, msgspec.Meta(max_length=MAX_STRING)], "double": float,
                         "int": int, "bool": bool}
_FALLBACK = (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError)


_DECODERS: dict[int, tuple[TopicSpec, msgspec.json.Decoder | None]] = {}  # id(topic) → (topic, its decoder)


def columns(topic: TopicSpec) -> tuple[str, ...]:
    """The names of a validated row, in the order the Python checks give them (the bronze table's order)."""
    return ("schema_version", "event_id", "ts", *topic.fields)


def _decoder(topic: TopicSpec) -> msgspec.json.Decoder | None:
    """The topic's compiled decoder, made once per spec (None: a spec that redeclares the envelope, which
    ``parse_schema`` never makes, takes the Python path)."""
    known = _DECODERS.get(id(topic))
    if known is not None and known[0] is topic:
        return known[1]
    if len(_DECODERS) >= 1024:
        _DECODERS.clear()
    decoder = None
    if not any(name in ENVELOPE for name in topic.fields):
        decoder = msgspec.json.Decoder(TypedDict("Event", {  # type: ignore[misc]
            "schema_version": Literal[topic.version],
            "event_id": Annotated[str, msgspec.Meta(min_length=1, max_length=64)],
            "ts": Annotated[int, msgspec.Meta(gt=0)], **{name: _TYPES[kind] for name, kind in topic.fields.items()}}))
    _DECODERS[id(topic)] = (topic, decoder)
    return decoder


def parse(raw: bytes | None, topic: TopicSpec) -> dict[str, Any]:
    """The validated record: envelope + declared fields (doubles as float; keys in the record's order)."""
    if raw is None:
        raise Invalid("empty", "record has no value")
    if len(raw) > MAX_RECORD_BYTES:
        raise Invalid("oversize", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    decoder = _decoder(topic)
    if decoder is not None:
        try:
            return decoder.decode(raw)
        except _FALLBACK:
            pass  # the checks below say why (or accept it)
    return parse_checked(raw, topic)


def parse_many(raws: Sequence[bytes | None], topic: TopicSpec) -> list[dict[str, Any] | Invalid]:
    """``parse`` of each record, in order: the validated row, or the :class:`Invalid` it raised. A batch of valid
    records is decoded in one comprehension (no call per record); any refusal sends the batch through ``parse``."""
    decoder = _decoder(topic)
    if decoder is not None and None not in raws and max(map(len, raws), default=0) <= MAX_RECORD_BYTES:
        decode = decoder.decode
        try:
            return [decode(raw) for raw in raws]  # type: ignore[arg-type]
        except _FALLBACK:
            pass
    out: list[dict[str, Any] | Invalid] = []
    for raw in raws:
        try:
            out.append(parse(raw, topic))
        except Invalid as e:
            out.append(e)
    return out


def parse_checked(raw: bytes, topic: TopicSpec) -> dict[str, Any]:
    """``parse`` in Python: the reason and detail of an invalid record."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Invalid("bad_json", str(e)) from None
    if type(data) is not dict:
        raise Invalid("bad_json", "value is not a JSON object")
    version = data.get("schema_version")
    if version != topic.version or isinstance(version, bool):
        raise Invalid("schema_version", f"{topic.name}: schema_version {_describe(version)} is not the declared "
                                        f"{topic.version}")
    eid, ts = data.get("event_id"), data.get("ts")
    if type(eid) is not str or not 1 <= len(eid) <= 64:
        raise Invalid("invalid", f"field 'event_id': expected a string of 1-64 characters, got {_describe(eid)}")
    if type(ts) is not int or ts <= 0:
        raise Invalid("invalid", f"field 'ts': expected epoch microseconds (a positive integer), got {_describe(ts)}")
    out: dict[str, Any] = {"schema_version": version, "event_id": eid, "ts": ts}
    get, isfinite = data.get, math.isfinite
    for name, kind in topic.fields.items():
        v = get(name)
        t = type(v)
        if t is _EXACT[kind] and (t is not float or isfinite(v)) and (t is not str or len(v) <= MAX_STRING):
            out[name] = v
        else:
            out[name] = _field(name, kind, v)
    return out


def _field(name: str, kind: str, v: Any) -> Any:
    """A declared field's value that is not its kind's JSON type as it is (converted), or why it is invalid."""
    if v is None:
        raise Invalid("invalid", f"field {name!r}: missing (declared {kind})")
    types, what = _CHECKS[kind]
    if not isinstance(v, types) or (kind != "bool" and isinstance(v, bool)):
        raise Invalid("invalid", f"field {name!r}: expected {what} ({kind}), got {_describe(v)}")
    if kind == "double":
        v = float(v)
        if not math.isfinite(v):
            raise Invalid("invalid", f"field {name!r}: not a finite number")
    elif kind == "string" and len(v) > MAX_STRING:
        raise Invalid("invalid", f"field {name!r}: string of {len(v)} characters > {MAX_STRING}")
    return v
