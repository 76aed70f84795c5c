"""Conversations: the engine's request shape, and parsing of OpenAI-style messages."""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm_engine.errors import InvalidImage, InvalidRequest

ROLES = ("system", "user", "assistant", "tool")
DETAILS = ("auto", "low", "high")  # OpenAI's image detail: accepted, the models see the whole image
# "has text": one character other than ASCII blanks. The same class is the OpenAPI document's
# pattern, so a conversation the schema accepts is one the engine accepts (Python's ``\s``
# and JSON Schema's differ on some control characters).
TEXT_PATTERN = r"[^\t\n\v\f\r ]"
_TEXT = re.compile(TEXT_PATTERN)
DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)


@dataclass
class Message:
    """One turn. ``images`` hold encoded file bytes until the engine decodes them."""

    role: str
    text: str
    images: list[bytes] = field(default_factory=list)
    decoded: list[Image.Image] = field(default_factory=list)
    # assistant turns: OpenAI's tool_calls, ``function.arguments`` parsed into an object
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_id: str | None = None  # tool turns: the call this result answers


def has_text(text: str) -> bool:
    return _TEXT.search(text) is not None


def prompt_message(messages: list[Message]) -> Message:
    """The message a model answers: the conversation's last user message."""
    return next(m for m in reversed(messages) if m.role == "user")


def single_turn(prompt: str, image: bytes | None) -> list[Message]:
    """The shape of a plain ``prompt`` + ``image`` request."""
    return [Message("user", prompt, [image] if image is not None else [])]


def decode_data_url(url: str) -> bytes:
    """Bytes of a ``data:image/...;base64,...`` URL."""
    match = DATA_URL.match(url)
    if not match:
        raise InvalidImage("image_url must be a data URL like 'data:image/png;base64,<base64 bytes>'")
    try:
        return base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("image_url data URL does not hold valid base64") from None


def parse_openai_messages(messages: Any) -> list[Message]:
    """Parse OpenAI chat ``messages`` (string content or ``text``/``image_url`` parts).

    Remote ``http(s)`` image URLs are refused here; a caller that allows them fetches the
    bytes first and passes a data URL.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        if not isinstance(msg.get("name", ""), str):
            raise InvalidRequest(f"messages[{i}].name must be a string")
        content = msg.get("content")
        calls = _tool_calls(msg.get("tool_calls"), i) if role == "assistant" else []
        call_id = msg.get("tool_call_id") if role == "tool" else None
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidRequest(f"messages[{i}].tool_call_id must be a string")
        if content is None and role != "user":  # OpenAI sends null content with tool calls
            content = ""
        if isinstance(content, str):
            parsed.append(Message(role, content, tool_calls=calls, tool_call_id=call_id))
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        texts, images = [], []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if isinstance(ref, dict) and ref.get("detail", "auto") not in DETAILS:
                    raise InvalidRequest(f"{where}.image_url.detail must be one of {DETAILS}")
                if not isinstance(url, str):
                    raise InvalidRequest(f"{where}.image_url.url must be a string")
                if not url.startswith("data:"):
                    raise InvalidImage(
                        f"{where}: remote image URLs are not fetched here; send the image "
                        "inline as a data:image/...;base64 URL"
                    )
                images.append(decode_data_url(url))
            else:
                raise InvalidRequest(
                    f"{where} must be {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image_url', 'image_url': {'url': ...}}"
                )
        parsed.append(Message(role, "\n".join(texts), images, tool_calls=calls, tool_call_id=call_id))
    return parsed


def _as_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """An assistant turn's ``tool_calls``, each ``function.arguments`` (JSON text) parsed."""
    if value is None:
        return []
    shape = '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "<JSON object>"}}'
    if not isinstance(value, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list of {shape}")
    calls = []
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] must be {shape}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as text: the chat template writes a string as it is
        calls.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def to_openai(messages: list[Message]) -> list[dict[str, Any]]:
    """The OpenAI message form, images as data URLs (what ``<model>_stream`` accepts)."""
    out = []
    for message in messages:
        extra: dict[str, Any] = {}
        if message.tool_calls:
            extra["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _as_text(call["function"]["arguments"])}}
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            extra["tool_call_id"] = message.tool_call_id
        if not message.images:
            out.append({"role": message.role, "content": message.text, **extra})
            continue
        parts: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {"url": "data:application/octet-stream;base64," + base64.b64encode(data).decode()},
            }
            for data in message.images
        ]
        parts.append({"type": "text", "text": message.text})
        out.append({"role": message.role, "content": parts, **extra})
    return out
