"""Running a generation through the backend, with the metrics recorded once for every route."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from fastapi_app import metrics
from fastapi_app.backends.base import Backend, Delta, Final, GenerationRequest
from fastapi_app.settings import Settings
from vlm_engine.errors import Cancelled, EngineError, InvalidParameter, Overloaded, UnknownModel

T = TypeVar("T")


def check_model(settings: Settings, model: str | None) -> str:
    model = settings.default_model if model is None else model  # "" names no model
    if model not in settings.models:
        raise UnknownModel(f"unknown model {model!r}; available: {', '.join(settings.models)}")
    return model


def check_max_tokens(settings: Settings, max_tokens: int | None, name: str = "max_tokens") -> None:
    """The API's range (the OpenAPI maximum); a model's own smaller limit answers 413 later."""
    if max_tokens is not None and max_tokens > settings.max_tokens_cap:
        raise InvalidParameter(f"{name} must be between 1 and {settings.max_tokens_cap}, got {max_tokens}")


def with_defaults(settings: Settings, request: GenerationRequest) -> GenerationRequest:
    """Apply the service's seed defaults (MAX_NEW_TOKENS, TEMPERATURE, TOP_P) when set."""
    if request.max_tokens is None:
        request.max_tokens = settings.max_new_tokens
    if request.temperature is None:
        request.temperature = settings.temperature
    if request.top_p is None:
        request.top_p = settings.top_p
    return request


class Admission:
    """At most ``limit`` generations per model in flight in this service; one more is refused
    at once (503, Retry-After) instead of queueing behind the backend's own full queue, so a
    burst is refused in milliseconds. The default (80) is a model's MAX_RUNNING + MAX_WAITING."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight: Counter[str] = Counter()

    def enter(self, model: str) -> None:
        if self.in_flight[model] >= self.limit:
            raise Overloaded(
                f"{model} is at capacity: {self.in_flight[model]} generations in flight "
                f"(MAX_INFLIGHT_PER_MODEL={self.limit}); retry later"
            )
        self.in_flight[model] += 1

    def leave(self, model: str) -> None:
        self.in_flight[model] -= 1


async def generate(
    backend: Backend, request: GenerationRequest, admission: Admission | None = None
) -> AsyncIterator[str | Final]:
    """The backend's stream, timed: time to first token, between tokens, total, token count."""
    model = request.model
    start = last = time.perf_counter()
    first = True
    status = "error"
    entered = False
    try:
        if admission is not None:
            admission.enter(model)
            entered = True
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
        if entered:
            admission.leave(model)
        metrics.GENERATIONS.labels(model, status).inc()


async def first_item(stream: AsyncIterator[str | Final]) -> tuple[str | Final, AsyncIterator[str | Final]]:
    """Wait for the first item so that errors become a status code before a 200 stream starts."""
    item = await anext(stream)
    return item, stream


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``, unless the client disconnects first: then ``work`` is cancelled (the generation
    it awaits stops, its row is freed) and ``Cancelled`` raised. Uvicorn does not cancel a
    handler whose client left, so a plain answer (or a stream not begun) is watched here: the
    server's ``http.disconnect`` message wakes it at once (no polling interval)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        raise Cancelled("the client went away")
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone: once the body is read, the ASGI server's next message
    for the request is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def coalesced(stream: AsyncIterator[str | Final]) -> AsyncIterator[str | Final]:
    """``stream``, with the text chunks that piled up while the caller was busy (writing the
    last event to a slow client, or the event loop full) joined into one per answer: a client
    that keeps up gets every chunk as it comes, one that falls behind gets fewer, larger ones
    instead of a growing backlog. ``Final`` items and errors keep their place."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pull() -> None:
        try:
            async for item in stream:
                queue.put_nowait(item)
        except BaseException as exc:  # handed on, in order
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    task = asyncio.ensure_future(pull())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for item in _join_text(items):
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _join_text(items: list) -> list:
    """Consecutive text chunks of one answer (nothing of that answer between) become one."""
    out: list = []
    last: dict[int, int] = {}  # answer index -> place in out of its open text chunk
    for item in items:
        if isinstance(item, str):
            index = getattr(item, "index", 0)
            at = last.get(index)
            if at is not None:
                before = out[at]
                logprobs = (getattr(before, "logprobs", None) or []) + (getattr(item, "logprobs", None) or [])
                out[at] = Delta(before + item, logprobs or None, index)
                continue
            last[index] = len(out)
        elif isinstance(item, Final):
            last.pop(item.index, None)
        else:
            last.clear()
        out.append(item)
    return out
