"""Inbound alert webhooks: Alertmanager, Grafana and generic alerts become retrain requests of declared models.

Routes (OpenAPI at ``/docs``): ``POST /v1/alerts/alertmanager`` (Alertmanager webhook version 4),
``POST /v1/alerts/grafana`` (Grafana unified alerting), ``POST /v1/alerts`` (``{model, reason, evidence}``, with an
optional ``Idempotency-Key``), ``POST /alerts`` (deprecated: ``{"model_name": ...}``) and ``GET /healthz``; the
drift worker adds its read-only loop pages (``/models``, ``/api/models/{name}``: :mod:`driftloop.drift.page`).

Every other request (the loop pages and the docs excepted) passes :class:`Guard` first, in this order: 413 above
``max_body`` (by Content-Length, and by counting a streamed body), 429 with Retry-After above the sender's rate (a
token bucket per client address and credential, failed ones included), 401 without valid credentials
(:mod:`driftloop.drift.auth`), 400 for a body that is not JSON. Then the route: 422 for JSON of the wrong shape,
404 for an undeclared model (naming the declared ones), 202 with the request id(s) when accepted, 200 when the sink
reports a ``duplicate`` (the same dedupe key again), ``in_flight`` (a request for that model is running) or another
refusal (``over_budget``), 503 when the broker did not acknowledge the request (nothing of that alert was accepted:
send it again). Errors are one-line ``{"error": ...}`` bodies.

Alerts whose ``status`` is ``resolved`` never retrain. Each firing alert names its model in ``labels.model``;
its dedupe key is the source with groupKey, fingerprint and startsAt, so a re-sent delivery is a duplicate.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

import orjson
import uvicorn
from fastapi import APIRouter, FastAPI, Header, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from driftloop.core.kafka import DeliveryError
from driftloop.core.metrics import WEBHOOK_REQUESTS
from driftloop.drift.auth import SIGNATURE, Unauthorized, WebhookAuth

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ALERT_ROUTES = ("/v1/alerts/alertmanager", "/v1/alerts/grafana", "/v1/alerts", "/alerts")
PAGES = ("/models", "/models/", "/api/models/")  # the read-only loop pages (drift/page.py): open when served
DRAIN_BYTES = 16 << 20  # an oversized body up to this size is read and dropped so the client can read the 413
DRAIN_S = 2.0
MAX_BUCKETS = 10_000


class AlertSink(Protocol):
    """What the webhooks drive (the drift monitor)."""

    def models(self) -> list[str]:
        """The declared model names."""
        ...

    def alert(self, model: str, reason: str, evidence: dict[str, Any], key: str | None) -> tuple[str, str]:
        """Ask for a retrain of ``model``: (request id, "accepted" | "duplicate" | "in_flight"), or another word
        for a request refused on purpose (e.g. "over_budget", with "" for the id): it is answered 200 with that
        status. A known ``key`` is a duplicate. Raises DeliveryError when the broker did not acknowledge it."""
        ...


class Problem(Exception):
    """A request refused with ``code`` and a one-line reason."""

    def __init__(self, code: int, error: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(error)
        self.code, self.error, self.headers, self.extra = code, error, headers, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, **self.extra}, self.code, headers=self.headers)


def unknown_model(name: str, declared: list[str]) -> Problem:
    return Problem(404, f"unknown model {name!r}; declared models: {', '.join(declared) or 'none'}",
                   models=declared)


# --- payloads ----------------------------------------------------------------------------------------


class AlertmanagerAlert(BaseModel):
    """One alert of an Alertmanager (or Grafana) notification; extra fields are kept."""

    model_config = ConfigDict(extra="allow")
    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(description="``labels.model`` names the model to retrain")
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime  # noqa: N815 - the documented payload's names
    endsAt: datetime | None = None  # noqa: N815
    generatorURL: str = ""  # noqa: N815
    fingerprint: str


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook notification, version 4."""

    model_config = ConfigDict(extra="allow")
    version: Literal["4"]
    groupKey: str  # noqa: N815
    truncatedAlerts: int = 0  # noqa: N815
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    commonLabels: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    commonAnnotations: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    externalURL: str = ""  # noqa: N815
    alerts: list[AlertmanagerAlert] = Field(min_length=1)


class GrafanaAlert(AlertmanagerAlert):
    """One alert of a Grafana notification: Alertmanager's fields and Grafana's own."""

    values: dict[str, float | None] | None = None
    valueString: str | None = None  # noqa: N815
    silenceURL: str | None = None  # noqa: N815
    dashboardURL: str | None = None  # noqa: N815
    panelURL: str | None = None  # noqa: N815
    imageURL: str | None = None  # noqa: N815


class GrafanaPayload(BaseModel):
    """Grafana unified alerting's webhook notification; extra fields are kept."""

    model_config = ConfigDict(extra="allow")
    receiver: str = ""
    status: Literal["firing", "resolved"]
    orgId: int | None = None  # noqa: N815
    alerts: list[GrafanaAlert] = Field(min_length=1)
    groupLabels: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    commonLabels: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    commonAnnotations: dict[str, str] = Field(default_factory=dict)  # noqa: N815
    externalURL: str = ""  # noqa: N815
    version: str | None = None
    groupKey: str | None = None  # noqa: N815
    truncatedAlerts: int = 0  # noqa: N815
    title: str | None = None
    state: str | None = None
    message: str | None = None


class GenericAlert(BaseModel):
    """A retrain request for one model."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200)
    reason: str = Field("webhook", max_length=1000, description="free text, kept with the request")
    evidence: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=256,
                                        description="dedupe key (or the Idempotency-Key header)")


class Accepted(BaseModel):
    """The answer to a generic alert: 202 "accepted", else 200 with why nothing started."""

    status: str = Field(description='"accepted", "duplicate", "in_flight", or what the monitor refused it for')
    request_id: str | None = Field(description="the request started, or the one a duplicate belongs to")


class AlertOutcome(BaseModel):
    """What became of one alert of a delivery (resolved ones are ignored)."""

    index: int
    fingerprint: str
    model: str | None
    status: str = Field(description='as a generic alert\'s, or "ignored" for a resolved alert')
    request_id: str | None = None


class DeliveryOutcome(BaseModel):
    """The answer to an Alertmanager or Grafana delivery."""

    status: str = Field(description="accepted if any alert was, else duplicate, in_flight, the first other "
                                    "status, or ignored")
    request_ids: list[str] = Field(description="the requests this delivery started")
    alerts: list[AlertOutcome]


class ErrorBody(BaseModel):
    """Every refusal."""

    error: str


# --- the guard: size, rate, credentials, JSON ----------------------------------------------------------


class RateLimiter:
    """Token buckets: ``rate_per_s`` requests per second per key, ``burst`` at once."""

    def __init__(self, rate_per_s: float, burst: int):
        self.rate, self.burst = rate_per_s, burst
        self._buckets: dict[Any, tuple[float, float]] = {}  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: Any) -> float:
        """0 when ``key`` may go on (a token is taken), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:  # forget the refilled ones
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.rate < self.burst}
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) / self.rate
            self._buckets[key] = (tokens - 1, now)
            return 0.0


def page_path(path: str) -> bool:
    """A path of the loop pages (``/models``, ``/models/...``, ``/api/models/...``)."""
    return path == PAGES[0] or path.startswith(PAGES[1:])


def route_label(path: str) -> str:
    return path if path in ALERT_ROUTES or path in OPEN_PATHS else "page" if page_path(path) else "other"


class Guard:
    """ASGI middleware in front of every route but the open ones (and the loop pages when ``pages``); counts
    and logs every response."""

    def __init__(self, app: ASGIApp, auth: WebhookAuth, limiter: RateLimiter, max_body: int, pages: bool = False):
        self.app, self.auth, self.limiter, self.max_body, self.pages = app, auth, limiter, max_body, pages

    def is_open(self, path: str) -> bool:
        return path in OPEN_PATHS or (self.pages and page_path(path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent: dict[str, Any] = {}
        scope = {**scope, "state": {**scope.get("state", {}), "outcome": []}}  # what the route did, for the log

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["code"] = message["status"]
            await send(message)

        client = (scope.get("client") or ("?", 0))[0]
        try:
            if self.is_open(scope["path"]):
                return await self.app(scope, receive, tracked)
            try:
                body = await self.admit(scope, receive, client)
            except Problem as p:
                scope["state"]["outcome"].append(p.error)
                return await p.response()(scope, receive, tracked)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))  # JSON whatever it says (curl -d)
            await self.app(scope, replay(body, receive), tracked)
        except Exception:
            log.exception("webhook %s %s from %s failed", scope["method"], scope["path"], client)
            if "code" not in sent:
                await Problem(500, "internal error").response()(scope, receive, tracked)
        finally:
            code = sent.get("code", 500)
            WEBHOOK_REQUESTS.labels(route=route_label(scope["path"]), code=str(code)).inc()
            log.log(logging.DEBUG if self.is_open(scope["path"]) else logging.INFO, "webhook %s %s from %s: %d %s",
                    scope["method"], scope["path"], client, code, "; ".join(scope["state"]["outcome"]))

    async def admit(self, scope: Scope, receive: Receive, client: str) -> bytes:
        """The body of a request that may go on to its route, else the Problem that refuses it."""
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await drain(receive, int(length) <= DRAIN_BYTES)
            raise self.too_large()
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Problem(400, "the client went away before the body ended")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await drain(receive, more)
                raise self.too_large()
        body = b"".join(chunks)
        try:
            principal, failure = self.auth.authenticate(headers, body), None
        except Unauthorized as e:
            principal, failure = None, e
        wait = self.limiter.take((client, principal))
        if wait:
            raise Problem(429, f"too many requests: at most {self.limiter.rate:g}/s (burst {self.limiter.burst}) "
                               "per sender", headers={"Retry-After": str(math.ceil(wait))})
        if failure is not None:
            raise Problem(401, str(failure), headers={"WWW-Authenticate": "Bearer"})
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise Problem(400, f"malformed JSON: {e}") from None
        return body

    def too_large(self) -> Problem:
        return Problem(413, f"body larger than {self.max_body} bytes", headers={"Connection": "close"})


async def drain(receive: Receive, more: bool) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES, DRAIN_S), so the client reads the answer
    instead of a connection reset."""
    size, deadline = 0, time.monotonic() + DRAIN_S
    while more and size <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return
        size += len(message.get("body", b""))
        more = message["type"] == "http.request" and message.get("more_body", False)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already read body to the app, then waits for the client as usual."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again


# --- the app -------------------------------------------------------------------------------------------


def dedupe_key(source: str, *parts: str) -> str:
    return f"{source}:" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def delivery_status(states: list[str]) -> str:
    """A delivery's status: accepted if any alert was, else duplicate, in_flight, the first other status (a
    refusal), or ignored when every alert was resolved."""
    return next((s for s in ("accepted", "duplicate", "in_flight") if s in states),
                next((s for s in states if s != "ignored"), "ignored"))


ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody, "description": d} for c, d in {
    400: "malformed JSON", 401: "no valid credentials, stale timestamp or replayed signature", 404: "unknown model",
    413: "body too large", 422: "JSON of the wrong shape", 429: "above the sender's rate (see Retry-After)",
    503: "the broker did not acknowledge the request: send it again"}.items()}
CREDENTIALS = [Security(HTTPBearer(auto_error=False, description="the webhook token")),
               Security(APIKeyHeader(name=SIGNATURE, auto_error=False, description=(
                   "sha256=<hex of HMAC-SHA256(token, f'{ts}.' + body)>, with X-Driftloop-Timestamp: <ts, unix "
                   "seconds>")))]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)]


def create_app(sink: AlertSink, auth: WebhookAuth, *, max_body: int = 1 << 20, rate_per_s: float,
               burst: int, pages: APIRouter | None = None) -> FastAPI:
    """The webhook app driving ``sink``, with the read-only loop ``pages`` (``drift/page.py``, no credentials
    needed) when given; serve it with :func:`start_server`."""
    app = FastAPI(title="driftloop alert webhooks", version="1", description=(__doc__ or "").split("\n\n", 1)[1])
    app.add_middleware(Guard, auth=auth, limiter=RateLimiter(rate_per_s, burst), max_body=max_body,
                       pages=pages is not None)
    alerts = APIRouter(dependencies=CREDENTIALS, responses=ERRORS)

    @app.exception_handler(Problem)
    async def problem(request: Request, e: Problem) -> JSONResponse:
        request.state.outcome.append(e.error)
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def wrong_shape(request: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}"
                          for err in e.errors()[:5])
        return await problem(request, Problem(422, f"wrong shape: {where}"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return await problem(request, Problem(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(DeliveryError)
    async def not_acked(request: Request, e: DeliveryError) -> JSONResponse:
        return await problem(request, Problem(503, f"not accepted, send it again: {e}"))

    def ask(request: Request, model: str, reason: str, evidence: dict[str, Any],
            key: str | None) -> tuple[str | None, str]:
        """The sink's answer (no id: None), noted for the request's log line."""
        rid, status = sink.alert(model, reason, evidence, key)
        request.state.outcome.append(f"{model} {status} {rid}")
        return rid or None, status

    def one(request: Request, model: str, reason: str, evidence: dict[str, Any], key: str | None) -> JSONResponse:
        declared = sink.models()
        if model not in declared:
            raise unknown_model(model, declared)
        rid, status = ask(request, model, reason, evidence, key)
        return JSONResponse({"status": status, "request_id": rid}, 202 if status == "accepted" else 200)

    def delivery(request: Request, source: str, payload: AlertmanagerPayload | GrafanaPayload) -> JSONResponse:
        declared = sink.models()
        for i, a in enumerate(payload.alerts):  # refuse the whole delivery before asking for anything
            if a.status == "firing":
                if not a.labels.get("model"):
                    raise Problem(422, f"alerts[{i}].labels.model is missing: label each firing alert with the "
                                       "model to retrain")
                if a.labels["model"] not in declared:
                    raise unknown_model(a.labels["model"], declared)
        outcomes: list[dict[str, Any]] = []
        for i, a in enumerate(payload.alerts):
            rid, status = None, "ignored"
            if a.status == "firing":
                evidence = {"source": source, "receiver": payload.receiver, "group_key": payload.groupKey,
                            "external_url": payload.externalURL, "alert": a.model_dump(mode="json")}
                key = dedupe_key(source, payload.groupKey or "", a.fingerprint, a.startsAt.isoformat())
                rid, status = ask(request, a.labels["model"], source, evidence, key)
            outcomes.append({"index": i, "fingerprint": a.fingerprint, "model": a.labels.get("model"),
                             "status": status, "request_id": rid})
        status = delivery_status([o["status"] for o in outcomes])
        if status == "ignored":
            request.state.outcome.append(f"{len(outcomes)} resolved alert(s) ignored")
        body = {"status": status, "alerts": outcomes,
                "request_ids": [o["request_id"] for o in outcomes if o["status"] == "accepted"]}
        return JSONResponse(body, 202 if status == "accepted" else 200)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @alerts.post("/v1/alerts/alertmanager", status_code=202, response_model=DeliveryOutcome)
    def alertmanager(payload: AlertmanagerPayload, request: Request) -> JSONResponse:
        """Alertmanager webhook (version 4): each firing alert's ``labels.model`` is retrained once per
        groupKey + fingerprint + startsAt; resolved alerts are ignored."""
        return delivery(request, "alertmanager", payload)

    @alerts.post("/v1/alerts/grafana", status_code=202, response_model=DeliveryOutcome)
    def grafana(payload: GrafanaPayload, request: Request) -> JSONResponse:
        """Grafana unified alerting webhook: as Alertmanager's, dedupe on fingerprint + startsAt (+ groupKey)."""
        return delivery(request, "grafana", payload)

    @alerts.post("/v1/alerts", status_code=202, response_model=Accepted)
    def generic(payload: GenericAlert, request: Request, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        """Retrain ``model``; a repeated idempotency key is a duplicate (200)."""
        key = idempotency_key or payload.idempotency_key
        return one(request, payload.model, payload.reason, payload.evidence, key and f"key:{key}")

    @alerts.post("/alerts", status_code=202, response_model=Accepted, deprecated=True)
    def legacy(payload: dict[str, Any], request: Request, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        """Deprecated: use ``/v1/alerts``. ``{"model_name": ...}`` (or ``model``); the whole body is the evidence."""
        model = payload.get("model_name", payload.get("model"))
        if not isinstance(model, str) or not model:
            raise Problem(422, f"the alert needs model_name, one of: {', '.join(sorted(sink.models())) or 'none'}")
        key = idempotency_key or payload.get("idempotency_key")
        return one(request, model, "webhook", {"alert": payload}, f"key:{key}" if isinstance(key, str) else None)

    app.include_router(alerts)
    if pages is not None:
        app.include_router(pages)
    return app


# --- the server ----------------------------------------------------------------------------------------


@dataclass
class WebhookServer:
    """A running uvicorn server (daemon thread)."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def local_host(self) -> str:
        """The address clients on this machine connect to (a wildcard address becomes loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def url(self) -> str:
        """Base URL for clients on this machine."""
        host = self.local_host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(app: FastAPI, host: str, port: int, timeout: float = 20.0) -> WebhookServer:
    """Serve ``app`` on host:port (0 = a free port) in a daemon thread; returns once it accepts connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    config = uvicorn.Config(app, log_config=None, access_log=False, proxy_headers=False, lifespan="off",
                            server_header=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="webhook", daemon=True)
    thread.start()
    ws = WebhookServer(server, thread, host, sock.getsockname()[1])
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            ws.stop(1)
            raise RuntimeError(f"the webhook server did not start on {host}:{ws.port}")
        time.sleep(0.01)
    with socket.create_connection((ws.local_host, ws.port), timeout):
        pass
    log.info("alert webhooks on %s (POST /v1/alerts/alertmanager, /v1/alerts/grafana, /v1/alerts; docs at /docs)",
             ws.url)
    return ws
