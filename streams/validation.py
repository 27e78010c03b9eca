"""Parse and validate raw records; anything bad gets a reason for the dead-letter topic."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from driftloop.infra.contracts import Event

MAX_RECORD_BYTES = 64 * 1024


class Invalid(Exception):
    """A record that cannot be processed; ``reason`` is a short code, ``detail`` the message."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse(raw: bytes | None, contract: type[Event]) -> Event:
    if raw is None:
        raise Invalid("empty", "record has no value")
    if len(raw) > MAX_RECORD_BYTES:
        raise Invalid("oversize", f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise Invalid("bad_json", str(e)) from None
    if not isinstance(data, dict):
        raise Invalid("bad_json", "value is not a JSON object")
    version = data.get("schema_version")
    if version != contract.SCHEMA_VERSION:
        raise Invalid("schema_version", f"{contract.__name__} schema_version {version!r} is not "
                                        f"{contract.SCHEMA_VERSION}")
    try:
        return contract.model_validate(data)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise Invalid("invalid", detail[:500]) from None
