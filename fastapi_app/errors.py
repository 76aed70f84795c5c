"""Exception handlers: every error in the shape of the API its path belongs to (``error_shapes``)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from fastapi_app.error_shapes import error_body
from vlm_engine.errors import EngineError

RETRY_AFTER_S = 1


def error_response(request: Request, status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    body = error_body(request.url.path, status, code, message, param)
    # overloaded, shutting down, Triton restarting: a client may try again shortly
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if p != "body"]
        if error["type"] == "json_invalid":
            return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
        param = param or (".".join(loc) or None)
        if error["type"] == "extra_forbidden":  # OpenAI's words for an argument it does not know
            problems.append(f"unrecognized request argument supplied: {'.'.join(loc)}")
            continue
        problems.append(f"{'.'.join(loc) or 'body'}: {error['msg']}")
    return "invalid request: " + "; ".join(problems), param


HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
MESSAGES = {"There was an error parsing the body": "request body could not be parsed: send UTF-8 JSON"}


def allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (Starlette's 405 names only the first route's)."""
    methods: list[str] = []
    for route in request.app.state.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods += [m for m in getattr(route, "methods", None) or () if m not in methods]
    return methods


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own errors (unparsable body, 404, 405) in the API's error shape."""
        detail = MESSAGES.get(str(exc.detail), str(exc.detail))
        response = error_response(request, exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), detail)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(request))
        return response

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError):
        return error_response(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(request, 400, "invalid_request", message, param)
