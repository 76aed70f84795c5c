"""OpenAI's legacy ``POST /v1/completions``: text in, text out, no chat template.

The translation room for this protocol: each prompt is the model's whole input as written
(``GenerationRequest.raw``; no images), with chat's sampling options; ``logprobs`` (an integer)
comes back in the legacy layout (tokens, token_logprobs, top_logprobs, text_offset); ``echo``
puts the prompt before the answer. Several prompts are answered at once, ``n`` each."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.fields import PositiveInteger, integer
from fastapi_app.generation import check_max_tokens, check_model, first_item, generate, unless_gone, with_defaults
from fastapi_app.routes.openai_api import StreamOptions
from vlm_engine.chat import Message
from vlm_engine.errors import EngineError, InvalidParameter
from vlm_engine.params import MAX_LOGIT_BIAS, resolve_logit_bias

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_PROMPTS = 16
StopString = Annotated[str, Field(min_length=1, max_length=200)]
PromptText = Annotated[str, Field(min_length=1)]
REFUSED = {
    "suffix": "insertion (fill-in-the-middle) is not served by these models",
    "best_of": "best_of is not served; send n for several answers",
}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="one of the served models (GET /v1/models)")
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="the text to continue, as the model reads it (no chat template), or a list of such texts"
    )
    max_tokens: PositiveInteger | None = Field(None, description=f"unset: {DEFAULT_MAX_TOKENS}, as OpenAI's")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: integer(ge=1, le=16) = Field(1, description="answers per prompt (MAX_N)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: integer(ge=0, le=5) | None = Field(None, description="the chosen token's and this many alternatives")
    echo: bool = Field(False, description="the prompt before the answer (not with logprobs)")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: integer(ge=-(2**53), le=2**53) | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="as in chat completions: token id -> bias, honoured per row"
    )
    user: str | None = Field(None, description="accepted; not used")

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, why in REFUSED.items():
                if values.get(name) is not None:
                    raise InvalidParameter(f"{name} is not supported here: {why}")
            if values.get("echo") is True and values.get("logprobs") is not None:
                raise InvalidParameter(
                    "echo with logprobs is not supported here: the prompt's logprobs are not computed"
                )
        return values

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sampling(self) -> dict[str, Any] | None:
        resolve_logit_bias(self.logit_bias)  # a bad key or bias: 400 here, before a backend is asked
        values = {
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "logit_bias": self.logit_bias or None,
            "logprobs": True if self.logprobs is not None else None,
            "top_logprobs": self.logprobs or None,
        }
        return {k: v for k, v in values.items() if v is not None} or None


def legacy_logprobs(entries: list[dict[str, Any]], start: int) -> dict[str, Any]:
    """Chat's per-token entries in the completions layout; offsets count from ``start``."""
    offsets, at = [], start
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
        "text_offset": offsets,
    }


def _finish(final: Final) -> str:
    return "length" if final.finish_reason == "length" else "stop"


async def _merged(streams: list[AsyncIterator[str | Final]]) -> AsyncIterator[tuple[int, str | Final]]:
    """The prompts' streams as one, items tagged with their prompt's place; an error in one ends all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pull(place: int, stream: AsyncIterator[str | Final]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((place, item))
        except BaseException as exc:
            queue.put_nowait((place, exc))
        finally:
            queue.put_nowait((place, done))

    tasks = [asyncio.ensure_future(pull(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            place, item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield place, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@router.post("/completions", operation_id="create_completion")
async def completions(body: CompletionRequest, request: Request):
    settings = request.app.state.settings
    model = check_model(settings, body.model)
    check_max_tokens(settings, body.max_tokens)
    if body.n > settings.max_n:
        raise InvalidParameter(f"n must be an integer from 1 to {settings.max_n} (MAX_N), got {body.n}")
    prompts = body.prompts
    started = []
    for prompt in prompts:
        generation = GenerationRequest(
            model,
            [Message("user", prompt)],
            body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS,
            body.temperature,
            body.top_p,
            body.stream,
            body.sampling(),
            n=body.n,
            raw=True,
        )
        started.append(
            generate(request.app.state.backend, with_defaults(settings, generation), request.app.state.admission)
        )
    try:  # every prompt at once; errors before any 200
        firsts = await unless_gone(request, asyncio.gather(*(first_item(stream) for stream in started)))
    except BaseException:
        for stream in started:
            await stream.aclose()  # the other prompts' rows are freed now
        raise
    streams = [_prepended(first, stream) for first, stream in firsts]
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    merged = _merged(streams)
    n = body.n

    if not body.stream:
        finals = await unless_gone(request, _collect(merged, len(prompts) * n, n))
        choices = []
        for place, prompt in enumerate(prompts):
            for index in range(n):
                final = finals[place * n + index]
                echo = prompt if body.echo else ""
                choices.append(
                    {
                        "index": place * n + index,
                        "text": echo + final.text,
                        "logprobs": legacy_logprobs(final.logprobs or [], len(echo))
                        if body.logprobs is not None
                        else None,
                        "finish_reason": _finish(final),
                    }
                )
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": _usage(finals, n),
        }

    usage_chunk = body.stream_options is not None and body.stream_options.include_usage

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, str]:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            data["usage"] = usage
        return {"data": json.dumps(data)}

    async def events():
        offsets: dict[int, int] = {}
        finals: dict[int, Final] = {}
        try:
            if body.echo:
                for place, prompt in enumerate(prompts):
                    for index in range(n):
                        yield chunk(
                            [{"index": place * n + index, "text": prompt, "logprobs": None, "finish_reason": None}]
                        )
            async for place, item in merged:
                at = place * n + getattr(item, "index", 0)
                if isinstance(item, Final):
                    finals[at] = item
                    yield chunk([{"index": at, "text": "", "logprobs": None, "finish_reason": _finish(item)}])
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = legacy_logprobs(getattr(item, "logprobs", None) or [], offsets.get(at, 0))
                offsets[at] = offsets.get(at, 0) + len(item)
                yield chunk([{"index": at, "text": str(item), "logprobs": logprobs, "finish_reason": None}])
            if usage_chunk:
                yield chunk([], _usage(finals, n))
        except EngineError as exc:  # mid-stream: the status line is already sent
            yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.code, "code": exc.code}})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, headers={"X-Accel-Buffering": "no"})


async def _prepended(first: str | Final, stream: AsyncIterator[str | Final]) -> AsyncIterator[str | Final]:
    yield first
    async for item in stream:
        yield item


async def _collect(merged, count: int, n: int) -> dict[int, Final]:
    finals: dict[int, Final] = {}
    async for place, item in merged:
        if isinstance(item, Final):
            finals[place * n + item.index] = item
            if len(finals) == count:
                break
    return finals


def _usage(finals: dict[int, Final], n: int) -> dict[str, int]:
    """Each prompt once (it is prefilled once for its n answers), every answer's tokens."""
    prompt = sum(final.prompt_tokens for at, final in finals.items() if at % n == 0)
    output = sum(final.output_tokens for final in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
