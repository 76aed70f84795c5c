"""API keys: ``API_KEYS`` (comma-separated) or ``API_KEYS_FILE`` (one per line) turn on
``Authorization: Bearer <key>`` for ``/v1``, ``/api`` and ``/v2/models`` (the service's own
KServe face, local backend), and for Triton's routes through
nginx, which asks ``GET /auth/check`` (``auth_request``). Health, the page and its static
files stay open. Keys are compared in constant time and never logged."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from fastapi_app.error_shapes import error_body

PROTECTED = ("/v1/", "/api/", "/v2/models/")  # the last: the service's own KServe face (local backend)
MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"


def load_keys(inline: str, file: Path | None) -> tuple[str, ...]:
    keys = [k.strip() for k in inline.split(",") if k.strip()]
    if file is not None:
        try:
            lines = file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"API_KEYS_FILE {file} cannot be read: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(keys)


def authorized(keys: tuple[str, ...], header: bytes | str | None, api_key: bytes | str | None = None) -> bool:
    """True when keys are off, or ``header`` is ``Bearer <one of keys>``, or ``api_key`` (the
    ``x-api-key`` header Anthropic's clients send) is one of keys."""
    if not keys:
        return True
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if isinstance(api_key, bytes):
        api_key = api_key.decode("latin-1")
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return _known(keys, token.strip())
    return bool(api_key and api_key.strip()) and _known(keys, api_key.strip())


def _known(keys: tuple[str, ...], token: str) -> bool:
    data = token.encode()
    return any(hmac.compare_digest(data, key.encode()) for key in keys)  # every key, in constant time


def unauthorized_body(path: str) -> bytes:
    if path.startswith("/v2/"):
        return json.dumps({"error": MESSAGE}).encode()  # Triton's error body
    body = error_body(path, 401, "invalid_api_key", MESSAGE)
    if "error" in body and "param" in body["error"]:  # OpenAI's: an auth failure is an invalid request
        body["error"]["type"] = "invalid_request_error"
    return json.dumps(body).encode()


class ApiKeys:
    """ASGI middleware: 401 (with the API's error body) for protected paths without a valid key."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(PROTECTED):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if authorized(self.keys, headers.get(b"authorization"), headers.get(b"x-api-key")):
            return await self.app(scope, receive, send)
        data = unauthorized_body(scope["path"])
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"www-authenticate", b'Bearer realm="vlm-serve"'),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": data})
