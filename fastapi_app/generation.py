"""Running a generation through the backend, with the metrics recorded once for every route."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi_app import metrics
from fastapi_app.backends.base import Backend, Final, GenerationRequest
from fastapi_app.settings import Settings
from vlm_engine.errors import EngineError, UnknownModel


def check_model(settings: Settings, model: str | None) -> str:
    model = model or settings.default_model
    if model not in settings.models:
        raise UnknownModel(f"unknown model {model!r}; available: {', '.join(settings.models)}")
    return model


def with_defaults(settings: Settings, request: GenerationRequest) -> GenerationRequest:
    """Apply the service's seed defaults (MAX_NEW_TOKENS, TEMPERATURE, TOP_P) when set."""
    if request.max_tokens is None:
        request.max_tokens = settings.max_new_tokens
    if request.temperature is None:
        request.temperature = settings.temperature
    if request.top_p is None:
        request.top_p = settings.top_p
    return request


async def generate(backend: Backend, request: GenerationRequest) -> AsyncIterator[str | Final]:
    """The backend's stream, timed: time to first token, between tokens, total, token count."""
    model = request.model
    start = last = time.perf_counter()
    first = True
    status = "error"
    try:
        async for item in backend.stream(request):
            now = time.perf_counter()
            if isinstance(item, Final):
                metrics.OUTPUT_TOKENS.labels(model).inc(item.output_tokens)
                metrics.GENERATION_SECONDS.labels(model).observe(now - start)
                status = "ok"
            elif first:
                metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(now - start)
                first = False
            else:
                metrics.INTER_TOKEN.labels(model).observe(now - last)
            last = now
            yield item
    except EngineError as exc:
        status = exc.code
        raise
    finally:
        metrics.GENERATIONS.labels(model, status).inc()


async def first_item(stream: AsyncIterator[str | Final]) -> tuple[str | Final, AsyncIterator[str | Final]]:
    """Wait for the first item so that errors become a status code before a 200 stream starts."""
    item = await anext(stream)
    return item, stream
