"""The drift alert webhook: external monitors POST JSON alerts that become retraining requests.

``POST /alerts`` with ``{"model_name": "...", ...}`` → 202 ``{"request_id": ...}``; 400 for a body that is
not a JSON object or has no ``model_name``; 404 (naming the declared models) for a model that is not declared;
503 when the request was not acknowledged by the broker (nothing was accepted: send the alert again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from driftloop.core.kafka import DeliveryError

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024


class UnknownModel(LookupError):
    """An alert names a model that is not declared."""

    def __init__(self, name: object, declared: list[str]):
        super().__init__(f"unknown model {name!r}; declared models: {', '.join(declared) or 'none'}")
        self.declared = declared


def start_webhook(port: int, on_alert: Callable[[dict[str, Any]], str]) -> ThreadingHTTPServer:
    """Serve on 127.0.0.1:port in a daemon thread; ``on_alert`` returns the request id."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = orjson.dumps(body)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/alerts":
                return self._reply(404, {"error": "POST /alerts"})
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY:
                return self._reply(400, {"error": f"body must be 1..{MAX_BODY} bytes of JSON"})
            try:
                alert = orjson.loads(self.rfile.read(n))
                if not isinstance(alert, dict):
                    raise ValueError("alert must be a JSON object")
                rid = on_alert(alert)
            except UnknownModel as e:
                return self._reply(404, {"error": str(e), "models": e.declared})
            except ValueError as e:
                return self._reply(400, {"error": str(e)})
            except DeliveryError as e:
                log.error("webhook: alert not accepted: %s", e)
                return self._reply(503, {"error": f"not accepted, send it again: {e}"})
            self._reply(202, {"request_id": rid})

        def log_message(self, fmt: str, *args: Any) -> None:
            log.info("webhook: " + fmt, *args)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info("drift alert webhook on http://127.0.0.1:%d/alerts", server.server_address[1])
    return server
