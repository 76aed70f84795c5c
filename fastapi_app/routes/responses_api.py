"""OpenAI's Responses API: ``POST /v1/responses`` (streamed or not), ``GET``/``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items``.

The translation room for this protocol: input items (and, with ``previous_response_id``, the
stored conversation before them) become OpenAI chat messages and go through the same parser,
checks and engine request as chat completions; the answer comes back as output items and the
SDK's event sequence. Responses are stored (``store``, default true) in the history database
(``fastapi_app.response_store``) unless ``STORE_RESPONSES=false``."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.error_shapes import error_body
from fastapi_app.fields import PositiveInteger, integer
from fastapi_app.generation import check_max_tokens, check_model, first_item, generate, unless_gone, with_defaults
from fastapi_app.remote_images import fetch_as_data_url
from fastapi_app.routes.openai_api import ToolCallHold
from vlm_engine.chat import DETAILS, parse_openai_messages
from vlm_engine.errors import EngineError, InvalidParameter, InvalidRequest, NotFound
from vlm_engine.tools import ToolCall, parse_tool_calls

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
log = logging.getLogger("fastapi_app.responses")

StopString = Annotated[str, Field(min_length=1, max_length=200)]
REFUSED = {
    "reasoning": "these models do not reason in hidden steps",
    "background": "responses run in the foreground here; leave background out",
    "conversation": "the Conversations API is not served; continue with previous_response_id",
    "prompt": "stored prompt templates are not served; send input",
    "top_logprobs": "log-probabilities are served by /v1/chat/completions (logprobs)",
    "max_tool_calls": "calls are bounded by parallel_tool_calls here",
}


IMAGE_DETAILS = (*DETAILS, "original")  # the Responses API's; the models see the whole image anyway


def _chat_detail(detail: str) -> str:
    return detail if detail in DETAILS else "auto"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class TextFormat(BaseModel):
    """``text.format``: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="with json_schema: the answer's schema")
    description: str | None = None
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="accepted; not used")


class ResponsesRequest(BaseModel):
    """The Responses API's request (strict types; an unknown field is a 400 naming it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="one of the served models (GET /v1/models)")
    input: str | list[dict[str, Any]] = Field(description="a string, or message / function_call_output items")
    instructions: str | None = Field(None, description="a system message for this response only (not carried on)")
    previous_response_id: str | None = Field(None, min_length=1, description="continue a stored response")
    max_output_tokens: PositiveInteger | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: integer(ge=-(2**53), le=2**53) | None = Field(None, description="extension, as in chat completions")
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="extension, as in chat completions: up to 4 strings"
    )
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="extension")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="extension")
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = Field(
        None, min_length=1, max_length=128, description='qwen3-vl: {"type": "function", "name", "parameters"}'
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = Field(True, description="keep the response for GET and previous_response_id")
    metadata: dict[str, str] | None = Field(None, description="stored and returned with the response")
    truncation: Literal["auto", "disabled"] | None = Field(
        None, description="accepted: a continued conversation is its last MAX_HISTORY responses"
    )
    include: list[str] | None = Field(None, max_length=0, description="nothing extra to include here")
    user: str | None = Field(None, description="accepted; not used")
    service_tier: str | None = Field(None, description="accepted; one tier")
    prompt_cache_key: str | None = Field(None, description="accepted; not used")
    safety_identifier: str | None = Field(None, description="accepted; not used")
    stream_options: dict[str, Any] | None = Field(None, description="accepted; not used")
    reasoning: dict[str, Any] | None = Field(
        None, description="only when it asks for nothing ({}): no hidden reasoning"
    )
    background: bool | None = Field(None, description="only false: responses run in the foreground")

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_cannot_be_honoured(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name, why in REFUSED.items():
                value = values.get(name)
                unset = isinstance(value, dict) and not any(v is not None for v in value.values())  # reasoning: {}
                if value not in (None, False) and not unset:
                    raise InvalidParameter(f"{name} is not supported here: {why}")
        return values

    def guide(self) -> dict[str, Any] | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"json_object": True}
        if fmt.schema_ is None:
            raise InvalidParameter("text.format of type json_schema needs text.format.schema")
        return {"json_schema": fmt.schema_}

    def sampling(self) -> dict[str, Any] | None:
        values = {
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "guide": self.guide(),
        }
        return {k: v for k, v in values.items() if v is not None} or None

    def tool_options(self) -> dict[str, Any] | None:
        if self.tools is None and self.tool_choice is None:
            return None
        tools = None
        if self.tools is not None:
            tools = []
            for i, tool in enumerate(self.tools):
                if tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                    raise InvalidParameter(
                        f'tools[{i}]: only function tools {{"type": "function", "name", "parameters"}} are served '
                        f"here, got type {tool.get('type')!r}"
                    )
                function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
                tools.append({"type": "function", "function": function})
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise InvalidParameter('tool_choice must be "none", "auto", "required" or {"type": "function", "name"}')
            choice = {"type": "function", "function": {"name": choice["name"]}}
        options: dict[str, Any] = {"tools": tools, "tool_choice": choice}
        if self.parallel_tool_calls is not None:
            options["parallel_tool_calls"] = self.parallel_tool_calls
        return options


# -- input items ----------------------------------------------------------------------------------
# the parts each role's message takes (images only from the user), and where a text part keeps its text
PARTS = {
    "user": ("input_text", "input_image"),
    "system": ("input_text", "output_text"),
    "developer": ("input_text", "output_text"),
    "assistant": ("input_text", "output_text", "refusal"),
}
TEXT_KEY = {"input_text": "text", "output_text": "text", "refusal": "refusal"}


def _parts(content: Any, role: str, where: str) -> list[dict[str, Any]]:
    """A message's content as Responses parts, those its role takes (``PARTS``), in OpenAI's shape
    (as ``input_items`` lists them, so a client may send them back)."""
    if isinstance(content, str):
        return [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of parts")
    parts = []
    allowed = PARTS[role]
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in allowed:
            raise InvalidRequest(
                f"{where}.content[{j}]: a {role} message takes {', '.join(allowed)} parts; got {kind!r}"
            )
        if kind in TEXT_KEY:
            if not isinstance(part.get(TEXT_KEY[kind]), str):
                raise InvalidRequest(f"{where}.content[{j}]: {kind} needs {TEXT_KEY[kind]} (a string)")
            parts.append({"type": kind, TEXT_KEY[kind]: part[TEXT_KEY[kind]]})
        else:
            url, detail = part.get("image_url"), part.get("detail", "auto")
            if not isinstance(url, str):
                raise InvalidRequest(f"{where}.content[{j}]: input_image needs image_url (file_id is not served)")
            if detail not in IMAGE_DETAILS:
                raise InvalidRequest(f"{where}.content[{j}].detail must be one of {IMAGE_DETAILS}")
            parts.append({"type": "input_image", "image_url": url, "detail": detail})
    return parts


def normalized_items(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items in their stored form, each with an id (``input_items`` lists them)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and item.get("role") in ("user", "system", "developer", "assistant"):
            role = item["role"]
            parts = _parts(item.get("content"), role, where)
            items.append(
                {"type": "message", "id": _new_id("msg"), "role": role, "content": parts, "status": "completed"}
            )
        elif kind == "function_call" and all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            if not isinstance(item.get("id", ""), str):
                raise InvalidRequest(f"{where}.id must be a string")
            call = {k: item[k] for k in ("call_id", "name", "arguments")}
            items.append(
                {"type": "function_call", "id": item.get("id") or _new_id("fc"), **call, "status": "completed"}
            )
        elif kind == "function_call_output" and isinstance(item.get("call_id"), str):
            output = item.get("output")
            if isinstance(output, list):
                if not all(
                    isinstance(p, dict) and p.get("type") == "input_text" and isinstance(p.get("text"), str)
                    for p in output
                ):
                    raise InvalidRequest(f"{where}.output must be a string or input_text parts (images are not served)")
                output = "\n".join(p["text"] for p in output)
            if not isinstance(output, str):
                raise InvalidRequest(f"{where}.output must be a string or input_text parts")
            items.append(
                {"type": "function_call_output", "id": _new_id("fco"), "call_id": item["call_id"], "output": output}
            )
        else:
            raise InvalidRequest(
                f"{where} must be a message {{role, content}}, a function_call or a function_call_output item; "
                f"got type {kind!r}"
            )
    return items


async def _inline_images(items: list[dict[str, Any]], settings) -> None:
    """Remote image URLs fetched (when ALLOW_REMOTE_IMAGES) into data URLs: stored responses
    keep the bytes, so a continued conversation sees the same image."""
    for item in items:
        for part in item.get("content", []) if item["type"] == "message" else []:
            url = part.get("image_url")
            if (
                part["type"] == "input_image"
                and url.startswith(("http://", "https://"))
                and settings.allow_remote_images
            ):
                part["image_url"] = await fetch_as_data_url(url, settings)


def to_chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input and output items as OpenAI chat messages: function calls join the assistant turn
    before them, their outputs become tool messages."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            content = [
                {"type": "image_url", "image_url": {"url": p["image_url"], "detail": _chat_detail(p["detail"])}}
                if p["type"] == "input_image"
                else {"type": "text", "text": p.get("text", p.get("refusal"))}
                for p in item["content"]
            ]
            messages.append({"role": role, "content": content})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


# -- the response -------------------------------------------------------------------------------
def output_items(final: Final, with_tools: bool) -> list[dict[str, Any]]:
    text, calls = parse_tool_calls(final.text) if with_tools else (final.text, [])
    items = [_message_item(text or "")] if (text or not calls) else []
    return items + [_call_item(call) for call in calls]


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": _new_id("msg"), "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }


def response_object(
    body: ResponsesRequest,
    response_id: str,
    created: int,
    model: str,
    stored: bool,
    output: list[dict[str, Any]],
    final: Final | None,
) -> dict[str, Any]:
    status = "in_progress" if final is None else ("incomplete" if final.finish_reason == "length" else "completed")
    usage = None
    if final is not None:
        usage = {
            "input_tokens": final.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": final.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": final.prompt_tokens + final.output_tokens,
        }
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": stored,
        "temperature": body.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none"),
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": body.truncation or "disabled",
        "usage": usage,
        "user": body.user,
        "metadata": body.metadata or {},
    }


# -- routes -------------------------------------------------------------------------------------
@router.post("/responses", operation_id="create_response")
async def create_response(body: ResponsesRequest, request: Request):
    settings, store = request.app.state.settings, request.app.state.responses
    model = check_model(settings, body.model)
    check_max_tokens(settings, body.max_output_tokens, "max_output_tokens")
    items = normalized_items(body.input)
    await _inline_images(items, settings)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        found = None
        if settings.store_responses:
            found = await run_in_threadpool(store.chain, body.previous_response_id, settings.max_response_chain)
        if found is None:
            raise NotFound(f"previous response {body.previous_response_id!r} not found (is it stored? store: true)")
        chain, longer = found
        if longer and body.truncation != "auto":
            raise InvalidRequest(
                f"the conversation before this response is longer than {settings.max_response_chain} responses "
                "(MAX_RESPONSE_CHAIN): send truncation: auto to leave out the oldest, or start a new conversation"
            )
        for stored in chain:
            history += stored.input_items + stored.response["output"]
    generation = GenerationRequest(
        model,
        parse_openai_messages(to_chat_messages(body.instructions, history + items)),
        body.max_output_tokens,
        body.temperature,
        body.top_p,
        body.stream,
        body.sampling(),
        body.tool_options(),
    )
    tools = generation.tools or {}
    with_tools = bool(tools.get("tools")) and tools.get("tool_choice") != "none"
    stream = generate(request.app.state.backend, with_defaults(settings, generation), request.app.state.admission)
    first, stream = await unless_gone(request, first_item(stream))
    response_id, created = _new_id("resp"), int(time.time())
    keep = body.store and settings.store_responses

    async def finish(final: Final, output: list[dict[str, Any]]) -> dict[str, Any]:
        response = response_object(body, response_id, created, model, keep, output, final)
        if keep:
            await run_in_threadpool(store.add, response, items)
        return response

    if not body.stream:
        final = first if isinstance(first, Final) else await unless_gone(request, _final(stream))
        return await finish(final, output_items(final, with_tools))
    start = response_object(body, response_id, created, model, keep, [], None)
    events = _events(start, first, stream, with_tools, finish)
    return EventSourceResponse(events, ping=15, headers={"X-Accel-Buffering": "no"})


async def _final(stream) -> Final:
    async for item in stream:
        if isinstance(item, Final):
            return item
    raise EngineError("the answer ended without its final item")


async def _events(start: dict[str, Any], first, stream, with_tools: bool, finish):
    """The SDK's event sequence: created, in_progress, the message item (its text part and
    deltas), function_call items (their arguments), then completed (or incomplete)."""
    sequence = 0

    def event(kind: str, **data: Any) -> dict[str, str]:
        nonlocal sequence
        sequence += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": sequence - 1, **data})}

    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    message = _message_item("", status="in_progress")
    message["content"] = []
    where = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    hold = ToolCallHold() if with_tools else None
    text, opened = "", False

    def opened_message() -> list[dict[str, str]]:
        """The message item and its text part, announced before their first text."""
        return [
            event("response.output_item.added", output_index=0, item=message),
            event("response.content_part.added", **where, part=part),
        ]

    try:
        item = first
        while not isinstance(item, Final):
            piece = hold.push(item) if hold is not None else str(item)
            if piece:
                for opening in [] if opened else opened_message():
                    yield opening
                opened = True
                text += piece
                yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
            item = await anext(stream)
        final, calls = item, []
        if hold is not None:
            tail, calls = hold.finish()
            if tail:
                for opening in [] if opened else opened_message():
                    yield opening
                opened = True
                text += tail
                yield event("response.output_text.delta", **where, delta=tail, logprobs=[])
        output: list[dict[str, Any]] = []
        if opened or not calls:
            for opening in [] if opened else opened_message():
                yield opening
            done_part = {**part, "text": text}
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=done_part)
            done = {**message, "status": "completed", "content": [done_part]}
            yield event("response.output_item.done", output_index=0, item=done)
            output.append(done)
        for call in calls:
            index, item = len(output), _call_item(call)
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            yield event(
                "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=call.arguments
            )
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=call.name,
                arguments=call.arguments,
            )
            yield event("response.output_item.done", output_index=index, item=item)
            output.append(item)
        response = await finish(final, output)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield event(kind, response=response)
    except EngineError as exc:  # mid-stream: the status line is already sent
        error = error_body("/v1/responses", exc.status, exc.code, exc.message)["error"]
        yield event("error", code=exc.code, message=exc.message, param=error["param"])
    except Exception:  # a bug here: the client still hears that the answer broke off
        log.exception("the Responses stream %s failed", start["id"])
        yield event("error", code="internal_error", message="internal error: the answer broke off", param=None)


async def _stored(request: Request, response_id: str):
    stored = None
    if request.app.state.settings.store_responses:
        stored = await run_in_threadpool(request.app.state.responses.get, response_id)
    if stored is None:
        raise NotFound(f"response {response_id!r} not found")
    return stored


@router.get("/responses/{response_id}", operation_id="retrieve_response")
async def retrieve_response(response_id: str, request: Request):
    return (await _stored(request, response_id)).response


@router.delete("/responses/{response_id}", operation_id="delete_response")
async def delete_response(response_id: str, request: Request):
    await _stored(request, response_id)
    await run_in_threadpool(request.app.state.responses.delete, response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/responses/{response_id}/input_items", operation_id="list_input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
):
    items = list((await _stored(request, response_id)).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise NotFound(f"item {after!r} is not an input item of response {response_id!r}")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
