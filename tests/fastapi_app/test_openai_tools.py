"""Tool calling through the OpenAI route with the official openai SDK, on both backends
(issue 18): ``message.tool_calls`` and streamed ``delta.tool_calls``, valid arguments even
from random weights when the choice is constrained."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.fastapi_app.test_openai_api import sdk
from tests.unit.test_tools import SCHEMAS, TOOLS

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def ask(api, **kwargs):
    options = {"model": "qwen3-vl", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.0, "tools": TOOLS}
    return sdk(api).chat.completions.create(**{**options, **kwargs})


def test_a_required_call_comes_back_as_tool_calls_streamed_and_not(any_api):
    whole = ask(any_api, tool_choice="required", parallel_tool_calls=False)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert call.type == "function" and call.id.startswith("call_")
    chunks = list(ask(any_api, tool_choice="required", parallel_tool_calls=False, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert [(t.function.name, t.function.arguments) for t in streamed] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks if c.choices)


def test_a_named_function_and_a_second_turn_with_its_result(any_api):
    first = ask(any_api, tool_choice={"type": "function", "function": {"name": "zoom"}})
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "zoom" and json.loads(call.function.arguments)["factor"] in (1, 2, 4)
    turn = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "zoomed in"},
    ]
    second = ask(any_api, messages=turn, tool_choice="none", max_tokens=8)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"model": "llava"}, "llava has no tool-calling format"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "without response_format"),
        # "function" not an object (schemathesis found these as 500s)
        ({"tool_choice": {"type": "function", "function": ["zoom"]}}, "tool_choice must be"),
        ({"tool_choice": {"type": "function", "function": "zoom"}}, "tool_choice must be"),
    ],
)
def test_tool_requests_that_cannot_work_are_a_400(any_api, kwargs, says):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, **kwargs)
    assert says in json.dumps(caught.value.body)
