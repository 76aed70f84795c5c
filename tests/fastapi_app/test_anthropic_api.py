"""Anthropic's Messages API with the official anthropic SDK, on both backends (issue 26): text
and image blocks, system prompts, streamed events, stop sequences, tool use and results,
count_tokens, and errors in Anthropic's shape. Answers are gibberish (random weights)."""

from __future__ import annotations

import base64
import json

import anthropic
import httpx
import jsonschema
import pytest

from tests.fastapi_app.test_openai_api import MODELS
from tests.unit.test_structured_output import SCHEMA
from tests.unit.test_tools import SCHEMAS

TOOLS = [{"name": name, "description": f"the {name} function", "input_schema": s} for name, s in SCHEMAS.items()]


def sdk(api) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key="unused", max_retries=0, timeout=120)


def image_turn(png: bytes, text: str = "What is in this image?") -> list[dict]:
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png).decode()}
    return [{"role": "user", "content": [{"type": "image", "source": image}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("model", MODELS)
def test_an_image_answered_plain_and_streamed_the_same(any_api, model, png):
    client = sdk(any_api)
    asked = dict(model=model, max_tokens=8, messages=image_turn(png), extra_body={"temperature": 0.0})
    whole = client.messages.create(**asked)
    assert whole.type == "message" and whole.role == "assistant"
    (block,) = whole.content
    assert block.type == "text" and block.text.strip()
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 8
    with client.messages.stream(**asked) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type not in ("text",)]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert final.content[0].text == block.text
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.stop_reason == whole.stop_reason


def test_system_prompt_as_string_and_blocks(any_api):
    client = sdk(any_api)
    asked = dict(
        model="qwen3-vl", max_tokens=4, messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": 0.0}
    )
    plain = client.messages.create(**asked)
    told = client.messages.create(**asked, system="Answer in French.")
    blocks = client.messages.create(**asked, system=[{"type": "text", "text": "Answer in French."}])
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert blocks.usage.input_tokens == told.usage.input_tokens and blocks.content[0].text == told.content[0].text


def test_a_stop_sequence_ends_the_answer_and_is_named(any_api):
    """The greedy answer's own third word is made a stop sequence: the answer ends before it."""
    client = sdk(any_api)
    asked = dict(
        model="llava",
        max_tokens=24,
        messages=[{"role": "user", "content": "Tell a story."}],
        extra_body={"temperature": 0.0},
    )
    free = client.messages.create(**asked).content[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    cut = client.messages.create(**asked, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == free[: free.index(stop)].rstrip()  # as a stop string ends any answer
    with client.messages.stream(**asked, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop
    assert streamed.content[0].text == cut.content[0].text


def test_top_k_1_is_greedy(any_api):
    client = sdk(any_api)
    asked = dict(model="qwen3-vl", max_tokens=12, messages=[{"role": "user", "content": "Tell a story."}])
    greedy = client.messages.create(**asked, extra_body={"temperature": 0.0}).content[0].text
    top_1 = {"temperature": 1.0, "top_k": 1}
    sampled = {client.messages.create(**asked, extra_body=top_1).content[0].text for _ in range(2)}
    assert sampled == {greedy}


def test_tool_use_and_its_result(any_api):
    client = sdk(any_api)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    asked = dict(model="qwen3-vl", max_tokens=64, tools=TOOLS, extra_body={"temperature": 0.0})
    made = client.messages.create(
        **asked, messages=question, tool_choice={"type": "any", "disable_parallel_tool_use": True}
    )
    assert made.stop_reason == "tool_use"
    (use,) = [b for b in made.content if b.type == "tool_use"]
    jsonschema.validate(use.input, SCHEMAS[use.name])
    with client.messages.stream(
        **asked, messages=question, tool_choice={"type": "any", "disable_parallel_tool_use": True}
    ) as stream:
        streamed = stream.get_final_message()
    (streamed_use,) = [b for b in streamed.content if b.type == "tool_use"]
    assert (streamed_use.name, streamed_use.input) == (use.name, use.input) and streamed.stop_reason == "tool_use"
    named = client.messages.create(**asked, messages=question, tool_choice={"type": "tool", "name": "get_weather"})
    assert [b.name for b in named.content if b.type == "tool_use"] == ["get_weather"]
    result = {"type": "tool_result", "tool_use_id": use.id, "content": json.dumps({"temperature": 21})}
    turns = [*question, {"role": "assistant", "content": made.content}, {"role": "user", "content": [result]}]
    answer = client.messages.create(**asked, messages=turns)
    assert answer.usage.input_tokens > made.usage.input_tokens  # the call and its result are in the prompt


def test_output_config_json_schema_validates(any_api):
    made = sdk(any_api).messages.create(
        model="qwen3-vl",
        max_tokens=64,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
        extra_body={"temperature": 0.0},
    )
    jsonschema.validate(json.loads(made.content[0].text), SCHEMA)


def test_count_tokens_is_the_prompt_a_message_would_have(any_api, png):
    client = sdk(any_api)
    for model in ("llava", "qwen3-vl"):
        counted = client.messages.count_tokens(model=model, messages=image_turn(png), system="Be brief.")
        made = client.messages.create(model=model, max_tokens=2, messages=image_turn(png), system="Be brief.")
        assert counted.input_tokens == made.usage.input_tokens > 0


@pytest.mark.parametrize(
    ("kwargs", "status", "kind", "says"),
    [
        ({"model": "nope"}, 404, "not_found_error", "unknown model 'nope'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error", "thinking"),
        ({"model": "llava", "tools": TOOLS}, 400, "invalid_request_error", "tool"),
        ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        ({"extra_body": {"temperature": 1.5}}, 400, "invalid_request_error", "temperature"),
        ({"output_config": {"effort": "high"}}, 400, "invalid_request_error", "effort"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            400,
            "invalid_request_error",
            "content[0]",
        ),
    ],
)
def test_errors_are_in_anthropics_shape(any_api, kwargs, status, kind, says):
    asked = {"model": "qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(anthropic.APIStatusError) as refused:
        sdk(any_api).messages.create(**asked)
    assert refused.value.status_code == status
    body = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind and says in body["error"]["message"], body


def test_a_missing_max_tokens_and_an_unknown_route_are_anthropic_errors(any_api):
    reply = httpx.post(
        any_api.url + "/v1/messages",
        json={"model": "qwen3-vl", "messages": [{"role": "user", "content": "hi"}]},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in reply.json()["error"]["message"]
    missing = httpx.get(any_api.url + "/v1/messages/batches")
    assert missing.status_code in (404, 405) and missing.json()["type"] == "error"
