"""The OpenAPI document: every error a route can answer, with its body's schema.

FastAPI lists only the success response (and a 422 this service never sends: validation
errors are 400). This adds, per operation, the errors it can return: 400 (malformed), 401
(API keys on), 404 (unknown model or session), 413 (body too large), 429 (per-client limit at
the gateway), 503 (overloaded, Triton unavailable, shutting down), each with the OpenAI
error body under ``/v1`` and ``{"detail", "code"}`` elsewhere."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERRORS = {
    "400": "malformed request: bad JSON, wrong types, out-of-range parameters, a bad image",
    "401": "missing or wrong API key (when API_KEYS is set)",
    "404": "unknown model or session",
    "413": "request body over the size limit",
    "429": "too many requests from this client (gateway limit); see Retry-After",
    "503": "overloaded, Triton unavailable or shutting down; see Retry-After",
}
SCHEMAS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": "string"},
                },
            }
        },
    },
    "APIError": {
        "type": "object",
        "required": ["detail", "code"],
        "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    },
}


def _error(path: str, status: str) -> dict[str, Any]:
    name = "OpenAIError" if path.startswith("/v1/") else "APIError"
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    response: dict[str, Any] = {"description": ERRORS[status], "content": content}
    if status in ("429", "503"):
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    if status == "401":
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def document(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            if path.startswith(("/v1/", "/api/")):
                for status in ERRORS:
                    responses.setdefault(status, _error(path, status))
            if path == "/health/ready":
                body = {"type": "object", "properties": {"status": {"type": "string"}, "not_ready": {"type": "array"}}}
                responses["503"] = {
                    "description": "not ready: Triton down or restarting, or the models in not_ready being reloaded",
                    "content": {"application/json": {"schema": body}},
                }
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
