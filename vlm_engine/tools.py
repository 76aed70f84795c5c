"""Tool calling in the Hermes format that Qwen3-VL's chat template uses.

The template lists the tools' signatures in the system turn; the model answers a call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (one block per call).
``tool_choice`` ``required`` or a named function turns into a grammar (``Guide`` of kind
``lark``) that only lets the model write such blocks for the allowed functions, with
arguments that match each function's parameter schema; ``auto`` leaves the model free and
``parse_tool_calls`` finds the blocks afterwards; ``none`` leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vlm_engine.errors import InvalidParameter
from vlm_engine.params import Guide

MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 4  # calls one constrained answer may hold (parallel_tool_calls)
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
NAME = re.compile(NAME_PATTERN)
OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
# how the chat template writes JSON (its tojson): ", " and ": ", no other whitespace
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolRequest:
    """The request's tools (OpenAI's ``{"type": "function", "function": {...}}`` objects), and
    what ``tool_choice`` made of them: render them in the prompt, constrain the answer."""

    tools: tuple[dict[str, Any], ...]
    render: bool
    guide: Guide | None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def resolve_tools(
    tools: Any, tool_choice: Any = None, tag: Callable[[str], str] = json.dumps, parallel: bool = True
) -> ToolRequest | None:
    """Check ``tools`` and ``tool_choice`` (OpenAI's shapes); ``None`` when no tools are given.
    ``tag`` writes ``<tool_call>``/``</tool_call>`` in Lark: the model's own token where its
    vocabulary has one (Qwen's has), else the characters. ``parallel`` (OpenAI's
    ``parallel_tool_calls``): ``required`` may make up to ``MAX_PARALLEL_CALLS`` calls, else one;
    a named function is called once."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise InvalidParameter("tool_choice needs tools")
        return None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise InvalidParameter(f"tools must be a list of 1 to {MAX_TOOLS} function tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise InvalidParameter(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidParameter(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -, got {name!r}")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, Mapping):
            raise InvalidParameter(f"tools[{i}].function.parameters must be a JSON schema object")
        if not isinstance(function.get("description"), str | None):  # null: none, as OpenAI's SDK types it
            raise InvalidParameter(f"tools[{i}]: the description must be a string, got {function['description']!r}")
        if not isinstance(function.get("strict"), bool | None):
            raise InvalidParameter(f"tools[{i}].function.strict must be true, false or null")
        names.append(name)
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("auto", "none"):
        return ToolRequest(tuple(tools), choice == "auto", None)
    if choice == "required":
        return ToolRequest(tuple(tools), True, tool_guide(tools, tag, MAX_PARALLEL_CALLS if parallel else 1))
    function = choice.get("function") if isinstance(choice, Mapping) else None
    wanted = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(choice, Mapping) or choice.get("type") != "function" or not isinstance(wanted, str):
        raise InvalidParameter(
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
    if wanted not in names:
        raise InvalidParameter(f"tool_choice names {wanted!r}, which is not among the tools {names}")
    return ToolRequest(tuple(tools), True, tool_guide([t for t in tools if t["function"]["name"] == wanted], tag))


def tool_guide(tools: list[dict[str, Any]], tag: Callable[[str], str] = json.dumps, most: int = 1) -> Guide:
    """A grammar for 1 to ``most`` ``<tool_call>`` blocks calling ``tools`` with valid arguments."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool["function"]["name"]},
                "arguments": tool["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = {"anyOf": calls, "x-guidance": JSON_STYLE}
    grammar = (
        f'start: {_up_to(most)}\ncall: {tag(OPEN)} "\\n" body "\\n" {tag(CLOSE)}\nbody: %json {json.dumps(schema)}\n'
    )
    return Guide("lark", grammar)


def _up_to(most: int) -> str:
    """Lark for 1 to ``most`` calls, one per line."""
    return "call" + ('("\\n" call' * (most - 1)) + (")?" * (most - 1))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """The answer's text without its ``<tool_call>`` blocks (None when nothing is left), and the
    calls in them; a block that is not a JSON object with a name is left in the text."""
    calls, kept, at = [], [], 0
    for match in CALL.finditer(text):
        try:
            body = json.loads(match[1])
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        arguments = body.get("arguments", {})
        kept.append(text[at : match.start()])
        at = match.end()
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", body["name"], json.dumps(arguments)))
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None), calls


def held_back(text: str) -> int:
    """How much of the end of ``text`` a stream keeps back: from an open ``<tool_call>`` on, or
    the end that could still become one."""
    at = text.find(OPEN)
    if at >= 0:
        return len(text) - at
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0
