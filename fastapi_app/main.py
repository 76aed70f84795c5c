"""The application: ``uvicorn --factory fastapi_app.main:create_app``."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from fastapi_app import errors, openapi
from fastapi_app.auth import ApiKeys
from fastapi_app.backends import make_backend
from fastapi_app.generation import Admission
from fastapi_app.history import HistoryStore
from fastapi_app.middleware import BodyLimit, RequestMetrics
from fastapi_app.response_store import ResponseStore
from fastapi_app.routes import (
    anthropic_api,
    api_docs,
    chat,
    completions_api,
    health,
    kserve,
    models_api,
    openai_api,
    responses_api,
    web,
)
from fastapi_app.settings import Settings

log = logging.getLogger("fastapi_app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.history = HistoryStore(settings.history_db, settings.max_history, settings.history_busy_timeout_s)
        app.state.responses = ResponseStore(
            settings.history_db,
            settings.max_stored_responses,
            settings.max_stored_responses_mb * 2**20,
            settings.history_busy_timeout_s,
        )
        await app.state.backend.start()
        log.info("serving %s through the %s backend", ", ".join(settings.models), app.state.backend.name)
        try:
            yield
        finally:
            await app.state.backend.close()
            app.state.history.close()
            app.state.responses.close()

    app = FastAPI(
        title="vlm-serve",
        description="Vision-language chat over Triton: OpenAI-compatible API, REST chat with history.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served offline by routes/api_docs.py (FastAPI's pages load from a CDN)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.backend = make_backend(settings)
    app.state.admission = Admission(settings.max_inflight_per_model)
    errors.install(app)
    openapi.install(app)
    routers = (
        openai_api.router,
        responses_api.router,
        anthropic_api.router,
        models_api.router,
        completions_api.router,
        chat.router,
        health.router,
        web.router,
        api_docs.router,
    )
    if settings.inference_backend == "local":  # KServe v2 answered here; with Triton, nginx sends /v2 to Triton
        routers += (kserve.router,)
    for router in routers:
        app.include_router(router)
    app.state.routes = [route for router in routers for route in router.routes]  # for 405's Allow
    app.mount(api_docs.ASSETS_URL, StaticFiles(directory=api_docs.ASSETS), name="api-docs")  # before /static
    app.mount("/static", StaticFiles(directory=web.STATIC), name="static")
    keys = settings.keys
    app.state.api_keys = keys
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeys, keys=keys)  # before the body is read: a request without a key costs nothing
    app.add_middleware(RequestMetrics)
    if keys:
        log.info("API keys on: %d key(s); /v1 and /api need 'Authorization: Bearer <key>'", len(keys))
    return app
