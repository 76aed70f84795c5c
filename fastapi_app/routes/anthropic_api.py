"""Anthropic's Messages API: ``POST /v1/messages`` (streamed or not) and ``/v1/messages/count_tokens``.

The translation room for this protocol: Anthropic's blocks become OpenAI-style messages and
go through the same parser, checks and engine request as chat completions; the answer comes
back as Anthropic's content blocks and events. Errors are in Anthropic's shape
(``fastapi_app.error_shapes``)."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.error_shapes import error_body
from fastapi_app.fields import PositiveInteger, integer
from fastapi_app.generation import check_max_tokens, check_model, first_item, generate, unless_gone, with_defaults
from fastapi_app.routes.openai_api import ToolCallHold, _inline_remote_images
from fastapi_app.schemas import IMAGE_MEDIA_TYPES
from vlm_engine.chat import parse_openai_messages
from vlm_engine.errors import EngineError, InvalidParameter, InvalidRequest
from vlm_engine.tools import ToolCall, parse_tool_calls

router = APIRouter(prefix="/v1", tags=["Anthropic-compatible"])
log = logging.getLogger("fastapi_app.anthropic")

StopSequence = Annotated[str, Field(min_length=1, max_length=200)]
REFUSED = {
    "thinking": "these models do not think in hidden steps; leave thinking out",
    "mcp_servers": "no MCP servers are reached from here",
    "container": "no code-execution containers here",
}


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the answer must match")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: OutputFormat | None = None
    effort: str | None = Field(None, description="not served: these models have one effort (a 400)")

    @model_validator(mode="after")
    def _no_effort(self) -> OutputConfig:
        if self.effort is not None:
            raise InvalidParameter("output_config.effort is not supported here: these models have one effort")
        return self


class _Conversation(BaseModel):
    """What the model reads: the turns, the system prompt, the tools (strict types; an unknown
    field is a 400 naming it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="one of the served models (GET /v1/models)")
    messages: list[dict[str, Any]] = Field(min_length=1, description="user and assistant turns of content blocks")
    system: str | list[dict[str, Any]] | None = Field(None, description="a string or text blocks")
    tools: list[dict[str, Any]] | None = Field(
        None, min_length=1, max_length=128, description="qwen3-vl: {name, description, input_schema}"
    )
    tool_choice: dict[str, Any] | None = Field(None, description='{"type": "auto" | "any" | "tool" | "none"}')
    thinking: dict[str, Any] | None = Field(None, description='only {"type": "disabled"}: no hidden thinking here')
    output_config: OutputConfig | None = Field(None, description="format: a JSON schema the answer matches")
    cache_control: dict[str, Any] | None = Field(None, description="accepted; prefixes are cached automatically")
    speed: str | None = Field(None, description="accepted; one speed")
    user_profile_id: str | None = Field(None, description="accepted; not used")
    workspace_id: str | None = Field(None, description="accepted; not used")

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, why in REFUSED.items():
                value = values.get(name)
                if value is not None and not (name == "thinking" and value == {"type": "disabled"}):
                    raise InvalidParameter(f"{name} is not supported here: {why}")
        return values


class CountTokensRequest(_Conversation):
    """``/v1/messages/count_tokens``: the conversation only."""

    output_format: dict[str, Any] | None = Field(None, description="accepted; the count does not depend on it")


class MessagesRequest(_Conversation):
    """Anthropic's request body."""

    max_tokens: PositiveInteger = Field(description="required, as in Anthropic's API")
    stop_sequences: list[StopSequence] | None = Field(None, max_length=4, description="up to 4 strings")
    temperature: float | None = Field(None, ge=0, le=1, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: integer(ge=1, le=1000) | None = Field(None, description="sample from the k likeliest tokens")
    stream: bool = False
    metadata: dict[str, Any] | None = Field(None, description="accepted; not stored")
    service_tier: str | None = Field(None, description="accepted; one tier")
    inference_geo: str | None = Field(None, description="accepted; served where it runs")
    diagnostics: dict[str, Any] | None = Field(None, description="accepted; not used")


def _text_of(blocks: Any, where: str) -> str:
    """A string, or text blocks joined (system prompts, tool results)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise InvalidRequest(f"{where} must be a string or a list of text blocks")
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f'{where}[{j}] must be a text block {{"type": "text", "text": ...}}')
        texts.append(block["text"])
    return "\n".join(texts)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise InvalidRequest(f"{where}.source needs media_type and data (base64) strings")
        if media not in IMAGE_MEDIA_TYPES:
            raise InvalidRequest(
                f"{where}.source.media_type must be one of {', '.join(IMAGE_MEDIA_TYPES)}, got {media!r}"
            )
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise InvalidRequest(
        f'{where}.source must be {{"type": "base64", "media_type", "data"}} or {{"type": "url", "url"}}'
    )


def to_openai_messages(body: _Conversation) -> list[dict[str, Any]]:
    """Anthropic's turns as OpenAI chat messages: tool results become ``tool`` messages, tool
    uses an assistant's ``tool_calls``."""
    out: list[dict[str, Any]] = []
    if body.system is not None:
        out.append({"role": "system", "content": _text_of(body.system, "system")})
    for i, message in enumerate(body.messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant") or set(message) - {"role", "content"}:
            raise InvalidRequest(f'messages[{i}] must be {{"role": "user" | "assistant", "content": ...}}')
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of content blocks")
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                parts.append(_image_part(block, where))
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise InvalidRequest(f"{where}.tool_use_id must be a string")
                if not isinstance(block.get("is_error", False), bool):
                    raise InvalidRequest(f"{where}.is_error must be true or false")
                result = _text_of(block.get("content", ""), f"{where}.content")
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
            elif kind == "tool_use" and role == "assistant":
                if not all(isinstance(block.get(k), t) for k, t in (("id", str), ("name", str), ("input", dict))):
                    raise InvalidRequest(f"{where} must be a tool_use block with an id, a name and an input object")
                arguments = json.dumps(block["input"])
                calls.append(
                    {
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": arguments},
                    }
                )
            else:
                allowed = "text, image, tool_result" if role == "user" else "text, tool_use"
                raise InvalidRequest(f"{where}: a {role} turn takes {allowed} blocks here, got {kind!r}")
        if parts or calls or not any(b.get("type") == "tool_result" for b in content if isinstance(b, dict)):
            entry: dict[str, Any] = {"role": role, "content": parts}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def _tools(body: _Conversation) -> dict[str, Any] | None:
    """Anthropic's tools and tool_choice in the engine's (OpenAI's) shape."""
    if body.tools is None and body.tool_choice is None:
        return None
    tools = None
    if body.tools is not None:
        tools = []
        for i, tool in enumerate(body.tools):
            if tool.get("type") not in (None, "custom"):
                raise InvalidParameter(
                    f"tools[{i}]: server tools ({tool.get('type')!r}) are not served here; send client tools "
                    "{name, description, input_schema}"
                )
            if not isinstance(tool.get("name"), str) or not isinstance(tool.get("input_schema"), dict):
                raise InvalidRequest(f"tools[{i}] must be {{name, description, input_schema}} (a client tool)")
            function = {"name": tool["name"], "parameters": tool["input_schema"]}
            if "description" in tool:  # checked with the rest by the engine (vlm_engine.tools)
                function["description"] = tool["description"]
            tools.append({"type": "function", "function": function})
    options: dict[str, Any] = {"tools": tools}
    choice = body.tool_choice
    if choice is not None:
        kind = choice.get("type")
        if kind == "tool":
            if not isinstance(choice.get("name"), str):
                raise InvalidRequest('tool_choice of type "tool" needs a name')
            options["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            options["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        else:
            raise InvalidRequest(f'tool_choice.type must be "auto", "any", "tool" or "none", got {kind!r}')
        parallel = choice.get("disable_parallel_tool_use", False)
        if not isinstance(parallel, bool):
            raise InvalidRequest(f"tool_choice.disable_parallel_tool_use must be true or false, got {parallel!r}")
        if parallel is True:
            options["parallel_tool_calls"] = False
    return options


async def _generation(body: _Conversation, request: Request, stream: bool) -> GenerationRequest:
    settings = request.app.state.settings
    model = check_model(settings, body.model)
    messages = to_openai_messages(body)
    await _inline_remote_images(messages, settings)
    generation = GenerationRequest(model, parse_openai_messages(messages), stream=stream, tools=_tools(body))
    if isinstance(body, MessagesRequest):
        check_max_tokens(settings, body.max_tokens)
        generation.max_tokens, generation.temperature, generation.top_p = body.max_tokens, body.temperature, body.top_p
        fmt = body.output_config.format if body.output_config is not None else None
        guide = {"json_schema": fmt.schema_} if fmt is not None else None
        sampling = {"stop": body.stop_sequences, "top_k": body.top_k, "guide": guide}
        generation.sampling = {k: v for k, v in sampling.items() if v is not None} or None
    return with_defaults(settings, generation)


def _tool_use(call: ToolCall) -> dict[str, Any]:
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": "toolu_" + call.id.removeprefix("call_"),  # Anthropic's prefix; the id is only echoed back
        "name": call.name,
        "input": arguments if isinstance(arguments, dict) else {},
    }


def _stop(final: Final, calls: list[ToolCall]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence."""
    if final.finish_reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    sequence = getattr(final, "stop_sequence", None)
    return ("stop_sequence", sequence) if sequence else ("end_turn", None)


def _usage(final: Final) -> dict[str, int]:
    return {"input_tokens": final.prompt_tokens, "output_tokens": final.output_tokens}


@router.post("/messages", operation_id="create_message")
async def messages(body: MessagesRequest, request: Request):
    generation = await _generation(body, request, body.stream)
    stream = generate(request.app.state.backend, generation, request.app.state.admission)
    first, stream = await unless_gone(request, first_item(stream))
    message_id = f"msg_{uuid.uuid4().hex}"
    with_tools = (
        bool(generation.tools and generation.tools.get("tools")) and generation.tools.get("tool_choice") != "none"
    )
    if not body.stream:
        final = first if isinstance(first, Final) else await unless_gone(request, _final(stream))
        text, calls = parse_tool_calls(final.text) if with_tools else (final.text, [])
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not calls else []
        content += [_tool_use(call) for call in calls]
        reason, sequence = _stop(final, calls)
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": generation.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": _usage(final),
        }
    return EventSourceResponse(
        _events(message_id, generation.model, first, stream, with_tools), ping=15, headers={"X-Accel-Buffering": "no"}
    )


async def _final(stream) -> Final:
    async for item in stream:
        if isinstance(item, Final):
            return item
    raise EngineError("the answer ended without its final item")


def _event(kind: str, **data: Any) -> dict[str, str]:
    return {"event": kind, "data": json.dumps({"type": kind, **data})}


async def _events(message_id: str, model: str, first, stream, with_tools: bool):
    """Anthropic's event sequence: message_start, a text block (its deltas), tool_use blocks
    (their input as one input_json_delta), message_delta (stop reason, usage), message_stop."""
    start = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    yield _event("message_start", message=start)
    hold = ToolCallHold() if with_tools else None
    text_open, index = False, 0
    try:
        item = first
        while not isinstance(item, Final):
            piece = hold.push(item) if hold is not None else str(item)
            if piece:
                if not text_open:
                    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    text_open = True
                yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
            item = await anext(stream)
        final, calls = item, []
        if hold is not None:
            tail, calls = hold.finish()
            if tail:
                if not text_open:
                    yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
                    text_open = True
                yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": tail})
        if not text_open and not calls:  # an empty answer is one empty text block, as Anthropic's
            yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            text_open = True
        if text_open:
            yield _event("content_block_stop", index=0)
            index = 1
        for call in calls:
            block = {**_tool_use(call), "input": {}}
            yield _event("content_block_start", index=index, content_block=block)
            partial = json.dumps(_tool_use(call)["input"])
            yield _event(
                "content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": partial}
            )
            yield _event("content_block_stop", index=index)
            index += 1
        reason, sequence = _stop(final, calls)
        yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=_usage(final))
        yield _event("message_stop")
    except EngineError as exc:  # mid-stream: the status line is already sent
        yield _event("error", error=error_body("/v1/messages", exc.status, exc.code, exc.message)["error"])
    except Exception:  # a bug here: the client still hears that the answer broke off
        log.exception("the Anthropic stream %s failed", message_id)
        yield _event("error", error={"type": "api_error", "message": "internal error: the answer broke off"})


@router.post("/messages/count_tokens", operation_id="count_message_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    """The prompt's tokens (images included) as the model reads them: the engine prepares the
    request and answers without generating (``count_only``)."""
    generation = await _generation(body, request, stream=False)
    generation.count_only = True
    counted = generate(request.app.state.backend, generation, request.app.state.admission)
    final = await unless_gone(request, _final(counted))
    return {"input_tokens": final.prompt_tokens}
