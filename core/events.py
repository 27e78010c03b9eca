"""Validation of raw event records against their topic's declared schema (one schema per topic).

Every event is a JSON object with the envelope ``event_id`` (1-64 chars), ``ts`` (event time, UTC epoch
microseconds) and ``schema_version`` (the declared version), plus the declared fields, each required and
of its declared type. Fields not declared are dropped. Anything else raises :class:`Invalid` with a
reason for the dead-letter topic and a detail that names the field.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from driftloop.core.declarations import TopicSpec

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


def parse(raw: bytes | None, topic: TopicSpec) -> dict[str, Any]:
    """The validated record: envelope + declared fields (doubles as float)."""
    if raw is None:
        raise Invalid("empty", "record has no value")
    if len(raw) > MAX_RECORD_BYTES:
        raise Invalid("oversize", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
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
