"""Event contracts shared by every component (ARCHITECTURE.md, "Topics and contracts").

Every record carries ``event_id`` and ``ts`` (event time, UTC epoch microseconds) and a
``schema_version``; a breaking change bumps the version of that contract.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field


def now_us() -> int:
    """Current UTC time in epoch microseconds."""
    return time.time_ns() // 1000


def new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base of every record on a driftloop topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int = 1
    event_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    ts: int = Field(default_factory=now_us, gt=0, description="event time, UTC epoch microseconds")

    def model_post_init(self, __context: Any) -> None:
        if self.schema_version != self.SCHEMA_VERSION:
            raise ValueError(
                f"{type(self).__name__} schema_version {self.schema_version} is not supported "
                f"(expected {self.SCHEMA_VERSION})"
            )

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump())

    @classmethod
    def from_bytes(cls, raw: bytes):
        return cls.model_validate(orjson.loads(raw))


class Impression(Event):
    user_id: str = Field(min_length=1, max_length=64)
    ad_id: str = Field(min_length=1, max_length=64)
    campaign_id: str = Field(min_length=1, max_length=64)
    device: Literal["mobile", "desktop", "tablet"]
    country: str = Field(min_length=2, max_length=2)
    position: int = Field(ge=1, le=20)
    bid: float = Field(ge=0, le=1000)


class Click(Event):
    impression_id: str = Field(min_length=1, max_length=64)
    user_id: str = Field(min_length=1, max_length=64)
    ad_id: str = Field(min_length=1, max_length=64)


class Label(Event):
    """Whether an impression was clicked within the label window; ``event_id`` = impression id."""

    impression_id: str
    user_id: str
    label: Literal[0, 1]


class Prediction(Event):
    """A score for one impression; ``event_id`` is the scored impression's event id."""

    user_id: str
    model_name: str
    model_version: str
    score: float = Field(ge=0, le=1)
    features: dict[str, float]
    latency_s: float = Field(ge=0)


class DriftReport(Event):
    model_name: str
    model_version: str
    window_start_ts: int
    window_end_ts: int
    rows: int
    drift_share: float
    drifted: bool
    columns: dict[str, dict[str, float | bool]]
    performance: dict[str, float] = Field(default_factory=dict)
    report_url: str = ""


RetrainReason = Literal["drift", "performance", "webhook", "schedule", "manual", "bootstrap"]


class RetrainRequest(Event):
    request_id: str = Field(default_factory=new_id)
    model_name: str
    reason: RetrainReason
    evidence: dict[str, Any] = Field(default_factory=dict)
    since_ts: int | None = Field(None, description="train only on labels at or after this event time")


class ModelPromoted(Event):
    model_name: str
    version: str
    previous_version: str | None
    run_id: str
    metrics: dict[str, float]
    reason: str
    request_id: str | None = None
    timeline: dict[str, int] = Field(default_factory=dict, description="step -> epoch µs")


class ModelRejected(Event):
    model_name: str
    version: str | None
    run_id: str | None
    checks: dict[str, str]
    request_id: str | None = None


# logical topic name -> contract, key field (ARCHITECTURE.md topic table)
TOPICS: dict[str, tuple[type[Event] | None, str | None]] = {
    "events.impressions": (Impression, "user_id"),
    "events.clicks": (Click, "user_id"),
    "labels": (Label, "user_id"),
    "predictions": (Prediction, "user_id"),
    "predictions.shadow": (Prediction, "user_id"),
    "drift.reports": (DriftReport, "model_name"),
    "retrain.requests": (RetrainRequest, "model_name"),
    "models.promoted": (ModelPromoted, "model_name"),
    "models.rejected": (ModelRejected, "model_name"),
    "dlq": (None, None),
}
