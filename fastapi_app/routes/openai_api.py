"""OpenAI-compatible ``/v1/chat/completions`` (images, SSE streaming) and ``/v1/models``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.fields import PositiveInteger, integer
from fastapi_app.generation import (
    check_max_tokens,
    check_model,
    coalesced,
    first_item,
    generate,
    unless_gone,
    with_defaults,
)
from fastapi_app.remote_images import fetch_as_data_url
from vlm_engine.chat import parse_openai_messages
from vlm_engine.errors import EngineError, InvalidParameter
from vlm_engine.params import MAX_LOGIT_BIAS, resolve_logit_bias
from vlm_engine.tools import ToolCall, held_back, parse_tool_calls

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


StopString = Annotated[str, Field(min_length=1, max_length=200)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = Field(False, description="a last chunk with no choices and the usage")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must match")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="required with type json_schema")


UNSUPPORTED = {
    "functions": "the legacy functions API is not served; send tools",
    "function_call": "the legacy functions API is not served; send tool_choice",
    "audio": "answers are text only",
    "modalities": "answers are text only",
    "prediction": "predicted outputs (speculative decoding) are not served",
    "web_search_options": "no web search here",
    "reasoning_effort": "these models do not reason in hidden steps",
}


class ChatCompletionRequest(BaseModel):
    """Strict types (no "5" for 5); the message shapes, the model enum and the API's max_tokens
    maximum are in the OpenAPI document (``fastapi_app.openapi``) and checked by the engine."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="one of the served models (GET /v1/models)")
    messages: list[dict[str, Any]] = Field(
        min_length=1, description="OpenAI chat messages; image_url parts with data: URLs"
    )
    max_tokens: PositiveInteger | None = None
    max_completion_tokens: PositiveInteger | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    n: integer(ge=1, le=16) = Field(1, description="answers to the same prompt (MAX_N); the prompt is prefilled once")
    # bounds exact in a JSON number (a double): ±2**53
    seed: integer(ge=-(2**53), le=2**53) | None = Field(
        None, description="a sampled answer's own random stream: the same seed gives the same text"
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="up to 4 strings; the answer ends before the first"
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, gt=0, le=2, description="extension (transformers, vLLM): over prompt and answer; 1 = none"
    )
    logprobs: bool | None = Field(None, description="each output token's log-probability")
    top_logprobs: integer(ge=0, le=20) | None = Field(None, description="alternatives per token; needs logprobs")
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description=(
            'token id (as a string, e.g. "50") -> a bias from -100 to 100 added to that token\'s score, '
            "honoured per row (this request's answers alone, whatever shares their batch), before penalties "
            "and temperature: -100 bans the token, 100 all but forces it (greedy answers too). Ids 0 to 255 "
            "are in every served model's vocabulary (the OpenAPI document lists those); larger ones are taken "
            "up to the model's own vocabulary size, past it a 400"
        ),
    )
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | None = Field(None, description="extension (vLLM): a JSON schema for the answer")
    guided_regex: str | None = Field(
        None,
        min_length=1,
        description="extension (vLLM): a regex the answer matches (llguidance's dialect, as Rust's regex crate)",
        json_schema_extra={"format": "llguidance-regex"},
    )
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=256, description="extension (vLLM): the answer is one of these strings"
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        min_length=1,
        max_length=128,
        description='qwen3-vl: function tools, {"type": "function", "function": {"name", "description", "parameters"}}',
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None,
        description='"none", "auto" (the default with tools), "required" or {"type": "function", "function": {"name"}}',
    )
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (with required)")
    # OpenAI's fields that change nothing here: accepted
    user: str | None = Field(None, description="accepted; not used")
    metadata: dict[str, str] | None = Field(None, description="accepted; not stored")
    store: bool | None = Field(None, description="accepted; nothing is stored")
    service_tier: str | None = Field(None, description="accepted; one tier")
    prompt_cache_key: str | None = Field(None, description="accepted; not used")
    safety_identifier: str | None = Field(None, description="accepted; not used")

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, values: Any) -> Any:
        """OpenAI's fields this server cannot honour are a 400 that says so (never ignored);
        any other unknown field is a 400 too ("unrecognized request argument")."""
        if isinstance(values, dict):
            for name, why in UNSUPPORTED.items():
                if values.get(name) is not None:
                    raise InvalidParameter(f"{name} is not supported here: {why}")
        return values

    def tool_options(self) -> dict[str, Any] | None:
        if self.tools is None and self.tool_choice is None:
            return None
        options = {"tools": self.tools, "tool_choice": self.tool_choice}
        if self.parallel_tool_calls is not None:
            options["parallel_tool_calls"] = self.parallel_tool_calls
        return options

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is parsed for tool calls (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def guide(self) -> dict[str, Any] | None:
        """The one structured-output constraint asked for, in the engine's shape."""
        asked: dict[str, Any] = {}
        if self.response_format is not None and self.response_format.type == "text":
            asked["response_format"] = None  # plain text: no guide, but still one field of the four
        elif self.response_format is not None:
            if self.response_format.type == "json_object":
                asked["response_format"] = {"json_object": True}
            elif self.response_format.json_schema is None:
                raise InvalidParameter("response_format of type json_schema needs response_format.json_schema")
            else:
                asked["response_format"] = {"json_schema": self.response_format.json_schema.schema_}
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                asked[name] = {kind: getattr(self, name)}
        if len(asked) > 1:
            raise InvalidParameter(
                f"send one of response_format, guided_json, guided_regex, guided_choice; got {list(asked)}"
            )
        return next(iter(asked.values()), None)

    def sampling(self) -> dict[str, Any] | None:
        if self.top_logprobs is not None and self.logprobs is not True:
            raise InvalidParameter("top_logprobs needs logprobs set to true")
        resolve_logit_bias(self.logit_bias)  # a bad key or bias: 400 here, before a backend is asked
        values = {
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "guide": self.guide(),
            "logit_bias": self.logit_bias or None,  # JSON's string keys: the engine makes them ids
        }
        values = {k: v for k, v in values.items() if v is not None}
        return values or None


async def _inline_remote_images(messages: list[dict[str, Any]], settings) -> None:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    part["image_url"] = {"url": await fetch_as_data_url(url, settings)}


def _chunk(
    completion_id: str, created: int, model: str, delta: dict, finish: str | None = None, logprobs=None, index: int = 0
) -> str:
    choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return json.dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
    )


def _usage(finals: list[Final]) -> dict[str, int]:
    """The prompt once (it is prefilled once), every answer's tokens."""
    prompt, output = finals[0].prompt_tokens, sum(f.output_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def _call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class ToolCallHold:
    """A streamed answer that may hold tool calls: text goes out as it comes, except from a
    ``<tool_call>`` tag on (or what could still become one); the calls go out at the end."""

    def __init__(self) -> None:
        self.text, self.sent = "", 0

    def push(self, piece: str) -> str:
        self.text += piece
        upto = len(self.text) - held_back(self.text)
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_tool_calls(self.text[self.sent :])
        return (content or "") if calls else self.text[self.sent :], calls


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    settings = request.app.state.settings
    model = check_model(settings, body.model)
    check_max_tokens(settings, body.max_tokens)
    check_max_tokens(settings, body.max_completion_tokens)
    if body.n > settings.max_n:
        raise InvalidParameter(f"n must be an integer from 1 to {settings.max_n} (MAX_N), got {body.n}")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    await _inline_remote_images(body.messages, settings)
    generation = GenerationRequest(
        model,
        parse_openai_messages(body.messages),
        max_tokens,
        body.temperature,
        body.top_p,
        body.stream,
        body.sampling(),
        body.tool_options(),
        body.n,
    )
    stream = generate(request.app.state.backend, with_defaults(settings, generation), request.app.state.admission)
    if body.stream:
        stream = coalesced(stream)  # a client that falls behind gets fewer, larger chunks
    first, stream = await unless_gone(request, first_item(stream))
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        finals = await unless_gone(request, _finals(first, stream, body.n))
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [_choice(body, i, finals[i]) for i in range(body.n)],
            "usage": _usage(list(finals.values())),
        }

    usage_chunk = body.stream_options is not None and body.stream_options.include_usage

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        return {"data": _chunk(completion_id, created, model, delta, finish, logprobs, index)}

    async def events():
        for index in range(body.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        held = {i: ToolCallHold() for i in range(body.n)} if body.calls_tools else None
        finals: list[Final] = []
        try:
            item = first
            while True:
                index = getattr(item, "index", 0)
                if isinstance(item, Final):
                    finals.append(item)
                    finish = _finish(item.finish_reason)
                    if held is not None:
                        tail, calls = held[index].finish()
                        if tail:
                            yield chunk(index, {"content": tail})
                        if calls:
                            yield chunk(index, {"tool_calls": [{"index": i, **_call(c)} for i, c in enumerate(calls)]})
                            finish = "tool_calls" if finish == "stop" else finish
                    last = json.loads(chunk(index, {}, finish)["data"])
                    if not usage_chunk and len(finals) == body.n:  # on the last chunk, as before
                        last["usage"] = _usage(finals)
                    if item.entities is not None:
                        last["entities"] = item.entities
                    yield {"data": json.dumps(last)}
                    if len(finals) == body.n:
                        if usage_chunk:  # OpenAI's shape: a chunk with no choices, then [DONE]
                            usage = json.loads(_chunk(completion_id, created, model, {}))
                            usage["choices"], usage["usage"] = [], _usage(finals)
                            yield {"data": json.dumps(usage)}
                        break
                else:
                    logprobs = getattr(item, "logprobs", None) if body.logprobs else None
                    text = held[index].push(item) if held is not None else item
                    if text:
                        yield chunk(index, {"content": text}, logprobs=logprobs)
                item = await anext(stream)
        except EngineError as exc:  # mid-stream: the status line is already sent
            yield {"data": json.dumps({"error": {"message": exc.message, "type": exc.code, "code": exc.code}})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, headers={"X-Accel-Buffering": "no"})


async def _finals(item: str | Final, stream: AsyncIterator[str | Final], n: int) -> dict[int, Final]:
    """The n answers' last items, by index."""
    finals: dict[int, Final] = {}
    while True:
        if isinstance(item, Final):
            finals[item.index] = item
            if len(finals) == n:
                return finals
        item = await anext(stream)


def _choice(body: ChatCompletionRequest, index: int, final: Final) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": final.text}
    finish = _finish(final.finish_reason)
    if body.calls_tools:
        content, calls = parse_tool_calls(final.text)
        if calls:
            message["content"], message["tool_calls"] = content, [_call(call) for call in calls]
            finish = "tool_calls" if finish == "stop" else finish
    if final.entities is not None:
        message["entities"] = final.entities
    return {
        "index": index,
        "message": message,
        "finish_reason": finish,
        "logprobs": {"content": final.logprobs or []} if body.logprobs else None,
    }


@router.get("/models")
async def list_models(request: Request):
    ready = await request.app.state.backend.ready()
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "vlm-serve", "ready": ready.get(name, False)}
            for name in request.app.state.settings.models
        ],
    }
