"""API keys: ``API_KEYS`` (comma-separated) or ``API_KEYS_FILE`` (one per line) turn on
``Authorization: Bearer <key>`` for ``/v1``, ``/api`` and ``/v2/models`` (the service's own
KServe face, local backend), and for Triton's routes through
nginx, which asks ``GET /auth/check`` (``auth_request``). Health, the page and its static
files stay open. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

PROTECTED = ("/v1/", "/api/", "/v2/models/")  # the last: the service's own KServe face (local backend)
MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"


def load_keys(inline: str, file: Path | None) -> tuple[str, ...]:
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"API_KEYS_FILE {file} cannot be read: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(keys)


def authorized(keys: tuple[str, ...], header: bytes | str | None) -> bool:
    """True when keys are off, or ``header`` is ``Bearer <one of keys>``."""
    if not keys:
        return True
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    token = token.strip().encode()
    return any(hmac.compare_digest(token, key.encode()) for key in keys)  # every key, in constant time


def unauthorized_body(path: str) -> bytes:
    if path.startswith("/v2/"):
        return json.dumps({"error": MESSAGE}).encode()  # Triton's error body
    if path.startswith("/v1/"):
        error = {"message": MESSAGE, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
        body = {"error": error}
    else:
        body = {"detail": MESSAGE, "code": "invalid_api_key"}
    return json.dumps(body).encode()


class ApiKeys:
    """ASGI middleware: 401 (with the API's error body) for protected paths without a valid key."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        if authorized(self.keys, dict(scope["headers"]).get(b"authorization")):
            return await self.app(scope, receive, send)
        data = unauthorized_body(scope["path"])
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"www-authenticate", b'Bearer realm="vlm-serve"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": data})
