"""REST chat with server-side history: ``/api/chat`` and ``/api/sessions/{id}``."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from fastapi_app.backends.base import Final, GenerationRequest
from fastapi_app.fields import PositiveInteger, form_booleans
from fastapi_app.generation import (
    check_max_tokens,
    check_model,
    coalesced,
    first_item,
    generate,
    unless_gone,
    with_defaults,
)
from vlm_engine.chat import TEXT_PATTERN, Message, has_text
from vlm_engine.errors import EngineError, InvalidImage, InvalidRequest, NotFound

router = APIRouter(prefix="/api", tags=["REST chat"])

# a session id is a path segment of /api/sessions/{session_id}: no control character (nginx
# refuses a NUL in a path) and no slash, so every session made can be read and deleted
SESSION_ID_PATTERN = r"^[^\x00-\x1f\x7f/]+$"
SESSION_ID = {"min_length": 1, "max_length": 128, "pattern": SESSION_ID_PATTERN}


class ChatRequest(BaseModel):
    """JSON bodies are read strictly (no "5" for 5); multipart form fields are text, so leniently."""

    session_id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        description="up to 128 characters, no slash or control character",
        **SESSION_ID,
    )
    model: str | None = Field(None, description="a served model; unset: DEFAULT_MODEL")
    prompt: str = Field(
        description="the question or instruction (not blank)", json_schema_extra={"pattern": TEXT_PATTERN}
    )
    image: str | None = Field(None, description="base64 image bytes or a data: URL (or a multipart upload)")
    stream: bool = False
    max_tokens: PositiveInteger | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)


async def _read(request: Request) -> tuple[ChatRequest, bytes | None]:
    """JSON body, or multipart form fields with the image as a file upload."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and v != ""}
            upload = form.get("image")
            fields.pop("image", None)
            chat = ChatRequest.model_validate(form_booleans(fields, ("stream",)))
            return chat, (await upload.read()) if upload is not None and not isinstance(upload, str) else None
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("request body must be a JSON object")
        chat = ChatRequest.model_validate(payload, strict=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"invalid chat request: {problems}") from None
    if not has_text(chat.prompt):
        raise InvalidRequest("prompt is empty: send a question or instruction")
    if chat.image is None or chat.image == "":  # "" is no image, as an empty form field is
        return chat, None
    try:
        data = chat.image.split(",", 1)[1] if chat.image.startswith("data:") else chat.image
        image = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, IndexError):
        raise InvalidImage("image must be base64-encoded file bytes (or a data: URL)") from None
    if not image:
        raise InvalidImage("image is empty: send base64-encoded file bytes, or leave image out")
    return chat, image


def _conversation(history, prompt: str, image: bytes | None) -> list[Message]:
    messages = []
    for turn in history:
        messages += [Message("user", turn.prompt), Message("assistant", turn.response)]
    messages.append(Message("user", prompt, [image] if image else []))
    return messages


@router.post("/chat")
async def chat(request: Request):
    settings, store = request.app.state.settings, request.app.state.history
    body, image = await _read(request)
    model = check_model(settings, body.model)
    check_max_tokens(settings, body.max_tokens)
    await run_in_threadpool(store.check_open, body.session_id)
    history = await run_in_threadpool(store.turns, body.session_id)
    generation = GenerationRequest(
        model,
        _conversation(history, body.prompt, image),
        body.max_tokens,
        body.temperature,
        body.top_p,
        body.stream,
    )
    started = time.perf_counter()
    state = request.app.state
    generation_stream = generate(state.backend, with_defaults(settings, generation), state.admission)
    if body.stream:
        generation_stream = coalesced(generation_stream)  # a client that falls behind gets fewer, larger chunks
    first, stream = await unless_gone(request, first_item(generation_stream))

    async def answer(final: Final) -> dict[str, Any]:
        seconds = round(time.perf_counter() - started, 4)
        # committed before the answer leaves: an answered turn is never lost
        await run_in_threadpool(
            store.add, body.session_id, model, body.prompt, final.text, image is not None, seconds, final.output_tokens
        )
        result = {
            "session_id": body.session_id,
            "model": model,
            "response": final.text,
            "seconds": seconds,
            "finish_reason": final.finish_reason,
            "usage": {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.output_tokens},
        }
        if final.entities is not None:
            result["entities"] = final.entities
        return result

    if not body.stream:

        async def final_of(item: str | Final) -> Final:
            while not isinstance(item, Final):
                item = await anext(stream)
            return item

        return await answer(await unless_gone(request, final_of(first)))

    async def events():
        item = first
        try:
            while not isinstance(item, Final):
                yield {"data": json.dumps({"type": "chunk", "content": item})}
                item = await anext(stream)
            yield {"data": json.dumps({"type": "done", **(await answer(item))})}
        except EngineError as exc:
            yield {"data": json.dumps({"type": "error", "code": exc.code, "message": exc.message})}

    return EventSourceResponse(events(), ping=15, headers={"X-Accel-Buffering": "no"})


@router.get("/sessions/{session_id}", operation_id="get_session")
async def get_session(request: Request, session_id: str = Path(**SESSION_ID)):
    turns = await run_in_threadpool(request.app.state.history.turns, session_id)
    if not turns:
        raise NotFound(f"no session {session_id!r}")
    return {"session_id": session_id, "turns": [t.as_dict() for t in turns]}


@router.delete("/sessions/{session_id}", status_code=204, operation_id="delete_session")
async def delete_session(request: Request, session_id: str = Path(**SESSION_ID)):
    if not await run_in_threadpool(request.app.state.history.delete, session_id):
        raise NotFound(f"no session {session_id!r}")
    return Response(status_code=204)
