"""Tool calling for Qwen3-VL (issue 18): tools in the prompt in Qwen's format, ``required`` and
a named function constrained by a grammar, so even random weights make valid calls; the
answer's ``<tool_call>`` blocks parsed into calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.unit.test_scheduler import make_engine
from vlm_engine.chat import Message, parse_openai_messages
from vlm_engine.errors import InvalidParameter
from vlm_engine.tools import held_back, parse_tool_calls

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ZOOM = {
    "type": "object",
    "properties": {"factor": {"enum": [1, 2, 4]}},
    "required": ["factor"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "zoom", "parameters": ZOOM}},
]
SCHEMAS = {"get_weather": WEATHER, "zoom": ZOOM}
ASK = [Message("user", "What is the weather in Paris?")]


@pytest.fixture(scope="module")
def qwen(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "qwen3-vl")
    yield engine
    engine.close()


def answer(engine, choice, temperature=0.0, seed=None, parallel=True, messages=ASK, max_tokens=96):
    sampling = {"seed": seed} if seed is not None else None
    prepared = engine.prepare(
        messages,
        max_tokens,
        temperature,
        sampling=sampling,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=parallel,
    )
    return prepared, engine.generate([prepared])[0]


def calls_of(result):
    content, calls = parse_tool_calls(result.text)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return content, calls


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)])
def test_required_and_named_choices_make_valid_calls(qwen, temperature, seed):
    _, result = answer(qwen, "required", temperature, seed, max_tokens=400)  # up to 4 calls of ~60 tiny tokens
    content, calls = calls_of(result)
    assert 1 <= len(calls) <= 4 and content is None and result.finish_reason == "stop", result.text
    _, result = answer(qwen, "required", temperature, seed, parallel=False)
    content, calls = calls_of(result)
    assert len(calls) == 1 and content is None and result.finish_reason == "stop", result.text
    _, result = answer(qwen, {"type": "function", "function": {"name": "zoom"}}, temperature, seed)
    content, calls = calls_of(result)
    assert [c.name for c in calls] == ["zoom"] and result.finish_reason == "stop", result.text


def test_auto_lists_the_tools_and_none_leaves_them_out(qwen):
    prompt = qwen.adapter.tokenizer.decode(answer(qwen, "auto")[0].inputs["input_ids"][0])
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt
    prompt = qwen.adapter.tokenizer.decode(answer(qwen, "none")[0].inputs["input_ids"][0])
    assert "<tools>" not in prompt


def test_a_conversation_with_calls_and_results_renders_in_qwen_format(qwen):
    messages = parse_openai_messages(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
        ]
    )
    prepared, result = answer(qwen, "auto", messages=messages)
    prompt = qwen.adapter.tokenizer.decode(prepared.inputs["input_ids"][0])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert result.output_tokens > 0


def test_tools_are_refused_where_they_cannot_work(tiny_models_dir, qwen):
    with pytest.raises(InvalidParameter, match="not among the tools"):
        answer(qwen, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidParameter, match="tool_choice needs tools"):
        qwen.prepare(ASK, 8, tool_choice="required")
    with pytest.raises(InvalidParameter, match="without response_format"):
        qwen.prepare(ASK, 8, sampling={"guide": {"regex": "a+"}}, tools=TOOLS, tool_choice="required")
    wrong = [{"type": "function", "function": {**TOOLS[0]["function"], "description": 7}}]
    with pytest.raises(InvalidParameter, match=r"tools\[0\]: the description must be a string, got 7"):
        qwen.prepare(ASK, 8, tools=wrong)
    qwen.prepare(ASK, 8, tools=[{"type": "function", "function": {**TOOLS[0]["function"], "description": None}}])
    llava = make_engine(tiny_models_dir, "llava")
    try:
        with pytest.raises(InvalidParameter, match="llava has no tool-calling format"):
            llava.prepare(ASK, 8, tools=TOOLS)
    finally:
        llava.close()


def test_parsing_and_holding_back():
    text = 'Let me look.\n<tool_call>\n{"name": "zoom", "arguments": {"factor": 2}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in calls] == [("zoom", {"factor": 2})]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert held_back("plain text") == 0 and held_back("text <tool") == len("<tool")
    assert held_back("a <tool_call>\n{") == len("<tool_call>\n{")
