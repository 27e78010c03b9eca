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


class Label(Event):
    """The label of one scored event; ``event_id`` is the scored event's id, ``ts`` its event time."""

    model_name: str
    key: str = Field(description="the scored event's entity key, as text")
    label: float = Field(description="binary: 0/1; multiclass: the class index; regression: the value")


class Prediction(Event):
    """A model's output for one scored event; ``event_id``/``ts`` are the scored event's."""

    key: str = Field(description="the scored event's entity key, as text")
    model_name: str
    model_version: str
    score: float = Field(description="binary: P(positive); regression: the value; multiclass: the class index")
    probabilities: list[float] | None = Field(None, description="multiclass: one probability per class")
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
    columns: dict[str, dict[str, float | bool | str]] = Field(description="column -> score, threshold, drifted, method")
    performance: dict[str, float] = Field(default_factory=dict, description="metric estimate (label-free), realised "
                                          "metric (labels joined) and their reference values")
    breached: bool = Field(False, description="drift share or a performance drop breached the model's policy")
    reasons: list[str] = Field(default_factory=list, description="what breached: drift, estimated, realised")
    episode: Literal["none", "started", "ongoing", "ended"] = "none"
    episode_id: str | None = None
    report_url: str = Field("", description="the window's Evidently HTML report (file URI), when one was written")


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
    # failed: the request gave up after its attempts; refused: over the model's training compute quota
    outcome: Literal["rejected", "failed", "refused"] = "rejected"


class RetrainStatus(Event):
    """A retrain request moved: requested → data → training → evaluating → promoted / rejected / failed, or
    requested → refused (over the model's training compute budget)."""

    request_id: str
    model_name: str
    state: Literal["requested", "data", "training", "evaluating", "promoted", "rejected", "failed", "refused"]
    attempt: int = 0
    detail: dict[str, Any] = Field(default_factory=dict)


# driftloop's own topics: logical name -> contract, key field (declared event topics come from the repo)
TOPICS: dict[str, tuple[type[Event] | None, str | None]] = {
    "labels": (Label, "key"),
    "predictions": (Prediction, "key"),
    "predictions.shadow": (Prediction, "key"),
    "drift.reports": (DriftReport, "model_name"),
    "retrain.requests": (RetrainRequest, "model_name"),
    "models.promoted": (ModelPromoted, "model_name"),
    "models.rejected": (ModelRejected, "model_name"),
    "retrain.status": (RetrainStatus, "model_name"),
    "dlq": (None, None),
}
