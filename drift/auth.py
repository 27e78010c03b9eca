"""Webhook authentication: a bearer token, or an HMAC-SHA256 signature of the body with a timestamp.

Inbound requests carry either ``Authorization: Bearer <token>`` or ``X-Driftloop-Signature: sha256=<hex>``
with ``X-Driftloop-Timestamp: <unix seconds>``, where the hex is HMAC-SHA256(token, ``f"{ts}."`` + body). A
signed request is refused when its timestamp is more than ``max_skew_s`` away from this clock, and when the
same signature was already seen (a replay) while it could still pass the timestamp check. Outbound
notifications are signed the same way (:func:`sign`), so a driftloop webhook can receive another's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from driftloop.core.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE = "X-Driftloop-Signature"
TIMESTAMP = "X-Driftloop-Timestamp"
TOKEN_FILE = "webhook.token"
PRUNE_EVERY_S = 10.0


class Unauthorized(Exception):
    """The request's credentials are missing or wrong; the message says which (never the secret)."""


def signature(secret: str, body: bytes, ts: str) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``f"{ts}."`` + body)."""
    return "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    """The signature headers of ``body`` at ``ts`` (unix seconds; now when None)."""
    stamp = str(int(time.time()) if ts is None else int(ts))
    return {TIMESTAMP: stamp, SIGNATURE: signature(secret, body, stamp)}


class WebhookAuth:
    """Checks one token, as a bearer token or as the HMAC key of signed requests; thread-safe."""

    def __init__(self, token: str, max_skew_s: float = 300):
        if not token:
            raise ValueError("the webhook token must not be empty")
        self._token = token
        self.max_skew_s = max_skew_s
        self._seen: dict[str, float] = {}  # signature -> when it can no longer pass the timestamp check
        self._prune_at = 0.0
        self._lock = threading.Lock()

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> str:
        """The authenticated principal (``"token"``), or Unauthorized saying why. ``headers`` are looked up by
        lower-case name (Starlette's ``Headers`` and ``requests``' case-insensitive dicts both do that)."""
        bearer = headers.get("authorization")
        if bearer is not None:
            scheme, _, cred = bearer.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), self._token.encode()):
                raise Unauthorized("invalid bearer token")
            return "token"
        sig, ts = headers.get(SIGNATURE.lower()), headers.get(TIMESTAMP.lower())
        if sig is None:
            raise Unauthorized(f"no credentials: send Authorization: Bearer <token>, or {SIGNATURE} and {TIMESTAMP}")
        if ts is None or not ts.isdigit():
            raise Unauthorized(f"{TIMESTAMP} must be unix seconds")
        now = time.time()
        if abs(now - int(ts)) > self.max_skew_s:
            raise Unauthorized(f"stale timestamp: {now - int(ts):+.0f} s from this server's clock "
                               f"(at most {self.max_skew_s:g} s)")
        expected = signature(self._token, body, ts)
        if not hmac.compare_digest(sig.strip().lower().encode(), expected.encode()):
            raise Unauthorized("bad signature")
        with self._lock:
            if now >= self._prune_at:
                self._seen = {s: until for s, until in self._seen.items() if until >= now}
                self._prune_at = now + PRUNE_EVERY_S
            if expected in self._seen:
                raise Unauthorized("replayed signature: sign each request with a fresh timestamp")
            self._seen[expected] = int(ts) + self.max_skew_s + 1
        return "token"


def token_path(settings: Settings) -> Path:
    """Where the generated token lives (used when ``settings.webhook_token`` is unset)."""
    return settings.root / TOKEN_FILE


def load_or_create_token(settings: Settings) -> str:
    """``settings.webhook_token``, else the token in :func:`token_path`, generated once (mode 0600; safe when
    several processes race to create it)."""
    if settings.webhook_token:
        return settings.webhook_token
    path = token_path(settings)
    if not path.exists():
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)  # atomic, and never replaces a token another process wrote first
            log.info("generated the webhook token into %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return _read_token(path)


def _read_token(path: Path) -> str:
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it", path)
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: delete it to generate a new token, or set DRIFTLOOP_WEBHOOK_TOKEN")
    return token
