"""The error body of the API a path belongs to, for every refusal the service makes.

- ``/v1/messages...``: Anthropic's ``{"type": "error", "error": {"type", "message"}}``;
- the rest of ``/v1``: OpenAI's ``{"error": {"message", "type", "param", "code"}}``;
- elsewhere (``/api``): ``{"detail", "code"}``.

nginx's own refusals use the same shapes (``nginx/templates/vlm.conf.template``'s maps)."""

from __future__ import annotations

from typing import Any, Literal

Api = Literal["anthropic", "openai", "rest"]

OPENAI_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error"}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def api_of(path: str) -> Api:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "rest"


def error_body(path: str, status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    api = api_of(path)
    if api == "anthropic":
        kind = ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if api == "openai":
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        if status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message, "code": code}
