"""ASGI middleware: body size limit (413), per-route request metrics and a log line per request."""

from __future__ import annotations

import json
import logging
import re
import time

from fastapi_app import metrics
from fastapi_app.error_shapes import error_body


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, send)

    async def _too_large(self, scope, send):
        message = f"request body is over the limit of {self.max_bytes} bytes (MAX_BODY_BYTES); send a smaller image"
        data = json.dumps(error_body(scope["path"], 413, "too_large", message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})


class _TooLarge(Exception):
    pass


# One line per request: ``POST /v1/chat/completions 200 812.4ms id=<X-Request-ID>``. The
# probes and Prometheus' scrapes are logged at DEBUG (they come every few seconds). The stack
# starts uvicorn without its own access log and with fastapi_app/logging.json, which
# shows this logger's INFO lines.
access_log = logging.getLogger("fastapi_app.access")
QUIET_PATHS = frozenset({"/health", "/health/ready", "/metrics", "/favicon.ico"})
NOT_PRINTABLE = re.compile(rb"[^\x21-\x7e]")


def log_request(scope, status: int, seconds: float) -> None:
    level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    # the path as sent, any byte outside printable ASCII percent-encoded: none starts a line of its own
    raw = scope.get("raw_path") or scope["path"].encode()
    path = NOT_PRINTABLE.sub(lambda m: b"%%%02X" % m.group()[0], raw).decode("ascii")
    request_id = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"")
    request_id = NOT_PRINTABLE.sub(b"", request_id[:128])  # a caller's bytes make no line of their own
    suffix = f" id={request_id.decode('ascii')}" if request_id else ""
    access_log.log(level, "%s %s %d %.1fms%s", scope["method"], path, status, seconds * 1000, suffix)


class RequestMetrics:
    """Requests by route template and status, latency, in-flight; a log line for each."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        route = scope["path"] if scope["path"] in ("/", "/health", "/health/ready", "/metrics") else None

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        label = route or _template(scope)
        metrics.IN_FLIGHT.labels(label).inc()
        try:
            await self.app(scope, receive, capture)
        finally:
            metrics.IN_FLIGHT.labels(label).dec()
            metrics.REQUESTS.labels(label, scope["method"], str(status["code"])).inc()
            elapsed = time.perf_counter() - start
            metrics.REQUEST_SECONDS.labels(label).observe(elapsed)
            log_request(scope, status["code"], elapsed)


def _template(scope) -> str:
    path = scope["path"]
    if path.startswith("/api/sessions/"):
        return "/api/sessions/{id}"
    if path in ("/v1/chat/completions", "/v1/models", "/api/chat"):
        return path
    return "other"
