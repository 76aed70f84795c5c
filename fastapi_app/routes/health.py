"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fastapi_app.auth import authorized, unauthorized_body

router = APIRouter(tags=["health"])


@router.get("/health")
async def live():
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request):
    """Ready when the backend serves every served model (Triton up and models ready, or loaded locally)."""
    backend = request.app.state.backend
    models = await backend.ready()
    ok = bool(models) and all(models.values())
    body = {"status": "ready" if ok else "not ready", "backend": backend.name, "models": models}
    if not ok:
        body["not_ready"] = sorted(name for name, state in models.items() if not state)
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/auth/check", include_in_schema=False)
async def auth_check(request: Request):
    """For nginx's ``auth_request`` in front of Triton: 204 with a valid key (or keys off), else 401."""
    if authorized(request.app.state.api_keys, request.headers.get("authorization"), request.headers.get("x-api-key")):
        return Response(status_code=204)
    return Response(unauthorized_body("/v1/"), status_code=401, media_type="application/json")


@router.get("/metrics", include_in_schema=False)
async def metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
