"""Where each retrain request stands, persisted: requested → data → training → evaluating → promoted /
rejected / failed.

The controller moves a request through these states in driftloop's state database (one row per
request, one appended transition per move), so a controller killed at any step resumes the request
from its stored state, and a request delivered twice is handled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from driftloop.core.contracts import RetrainRequest, now_us
from driftloop.core.database import engine, requests, transitions
from driftloop.core.settings import Settings

STATES = ("requested", "data", "training", "evaluating", "promoted", "rejected", "failed", "refused")
TERMINAL = frozenset({"promoted", "rejected", "failed", "refused"})


@dataclass
class Stored:
    """One request's row."""

    request_id: str
    model: str
    reason: str
    state: str
    attempt: int
    not_before_us: int
    request: dict[str, Any]
    created_us: int
    updated_us: int
    data: dict[str, Any] | None = None
    version: str | None = None
    run_id: str | None = None
    error: str | None = None
    checks: dict[str, str] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def as_request(self) -> RetrainRequest:
        return RetrainRequest.model_validate(self.request)


class RequestStore:
    def __init__(self, settings: Settings):
        self.engine = engine(settings)

    def add(self, req: RetrainRequest) -> Stored:
        """The stored row of ``req``, created in state ``requested`` when it is new."""
        found = self.get(req.request_id)
        if found is not None:
            return found
        now = now_us()
        with self.engine.begin() as c:
            c.execute(requests.insert().values(
                request_id=req.request_id, model=req.model_name, reason=req.reason, state="requested", attempt=0,
                not_before_us=0, request=req.model_dump(), created_us=now, updated_us=now))
            c.execute(transitions.insert().values(request_id=req.request_id, state="requested", attempt=0, at_us=now,
                                                  detail={"reason": req.reason}))
        return self.get(req.request_id)  # type: ignore[return-value]

    def move(self, request_id: str, state: str, detail: dict[str, Any] | None = None, **values: Any) -> Stored:
        """Move a request to ``state`` (setting ``values`` too) and append the transition."""
        if state not in STATES:
            raise ValueError(f"unknown request state {state!r}; one of {STATES}")
        now = now_us()
        with self.engine.begin() as c:
            c.execute(update(requests).where(requests.c.request_id == request_id)
                      .values(state=state, updated_us=now, **values))
            attempt = c.execute(select(requests.c.attempt).where(requests.c.request_id == request_id)).scalar_one()
            c.execute(transitions.insert().values(request_id=request_id, state=state, attempt=attempt, at_us=now,
                                                  detail=detail or {}))
        return self.get(request_id)  # type: ignore[return-value]

    def get(self, request_id: str) -> Stored | None:
        with self.engine.connect() as c:
            row = c.execute(select(requests).where(requests.c.request_id == request_id)).mappings().first()
            if row is None:
                return None
            hist = c.execute(select(transitions.c.state, transitions.c.attempt, transitions.c.at_us,
                                    transitions.c.detail).where(transitions.c.request_id == request_id)
                             .order_by(transitions.c.id)).mappings().all()
        return Stored(**dict(row), history=[dict(h) for h in hist])

    def unfinished(self, model: str | None = None) -> list[Stored]:
        """Requests (of ``model``, or all) not yet promoted, rejected or failed, oldest first (a restarted
        controller resumes them)."""
        q = select(requests.c.request_id).where(requests.c.state.not_in(TERMINAL))
        if model is not None:
            q = q.where(requests.c.model == model)
        with self.engine.connect() as c:
            ids = c.execute(q.order_by(requests.c.created_us)).scalars().all()
        return [s for i in ids if (s := self.get(i)) is not None]

    def of_model(self, model: str) -> list[Stored]:
        """Every request of ``model``, oldest first, with its transitions."""
        with self.engine.connect() as c:
            ids = c.execute(select(requests.c.request_id).where(requests.c.model == model)
                            .order_by(requests.c.created_us)).scalars().all()
        return [s for i in ids if (s := self.get(i)) is not None]
