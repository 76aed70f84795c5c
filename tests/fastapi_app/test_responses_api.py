"""OpenAI's Responses API with the official openai SDK, on both backends (issue 26): plain
and streamed answers with an image, a stored conversation continued by
``previous_response_id``, retrieve / input_items / delete, ``text.format`` json_schema, function
calls and their outputs, and errors in OpenAI's shape. Answers are gibberish (random weights)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.fastapi_app.test_openai_api import MODELS, data_url, sdk
from tests.unit.test_structured_output import SCHEMA
from tests.unit.test_tools import SCHEMAS

TOOLS = [
    {"type": "function", "name": name, "description": f"the {name} function", "parameters": schema}
    for name, schema in SCHEMAS.items()
]


def image_input(png: bytes, text: str = "What is in this image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "input_text", "text": text}, {"type": "input_image", "image_url": data_url(png)}],
        }
    ]


@pytest.mark.parametrize("model", MODELS)
def test_an_image_answered_plain_and_streamed_the_same(any_api, model, png):
    client = sdk(any_api)
    whole = client.responses.create(model=model, input=image_input(png), max_output_tokens=8, temperature=0.0)
    assert whole.object == "response" and whole.status in ("completed", "incomplete")
    assert whole.output_text.strip()
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 8
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    events = list(
        client.responses.create(model=model, input=image_input(png), max_output_tokens=8, temperature=0.0, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_a_string_input_and_instructions(any_api):
    client = sdk(any_api)
    plain = client.responses.create(model="qwen3-vl", input="Say hi.", max_output_tokens=4, temperature=0.0)
    told = client.responses.create(
        model="qwen3-vl", input="Say hi.", instructions="Answer in French.", max_output_tokens=4, temperature=0.0
    )
    assert told.instructions == "Answer in French."
    assert told.usage.input_tokens > plain.usage.input_tokens  # the instructions are in the prompt


def test_previous_response_id_continues_with_the_first_turns_image(any_api, png):
    client = sdk(any_api)
    first = client.responses.create(model="qwen3-vl", input=image_input(png), max_output_tokens=6, temperature=0.0)
    second = client.responses.create(
        model="qwen3-vl", input="And its colour?", previous_response_id=first.id, max_output_tokens=6, temperature=0.0
    )
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn (its image tokens included) and the first answer
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    # streamed continuation: the same conversation, so the same greedy answer
    events = list(
        client.responses.create(
            model="qwen3-vl",
            input="And its colour?",
            previous_response_id=first.id,
            max_output_tokens=6,
            temperature=0.0,
            stream=True,
        )
    )
    assert events[-1].response.output_text == second.output_text
    assert events[-1].response.usage.input_tokens == second.usage.input_tokens


def test_a_stored_response_is_retrieved_listed_and_deleted(any_api, png):
    client = sdk(any_api)
    made = client.responses.create(
        model="llava", input=image_input(png), max_output_tokens=4, temperature=0.0, metadata={"case": "retrieve"}
    )
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text and got.metadata == {"case": "retrieve"}
    items = client.responses.input_items.list(made.id)
    (message,) = items.data
    assert message.role == "user" and [c.type for c in message.content] == ["input_text", "input_image"]
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as gone:
        client.responses.retrieve(made.id)
    assert gone.value.body["message"].startswith(f"response '{made.id}' not found")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="llava", input="hi", previous_response_id=made.id, max_output_tokens=2)


def test_store_false_keeps_nothing(any_api):
    client = sdk(any_api)
    made = client.responses.create(model="kosmos2", input="hi", store=False, max_output_tokens=2)
    assert made.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_json_schema_output_validates(any_api):
    made = sdk(any_api).responses.create(
        model="qwen3-vl",
        input="Describe a person as JSON.",
        max_output_tokens=64,
        temperature=0.0,
        text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}},
    )
    jsonschema.validate(json.loads(made.output_text), SCHEMA)
    assert made.text.format.type == "json_schema"


def test_a_function_call_and_its_output_in_the_next_turn(any_api):
    client = sdk(any_api)
    asked = dict(model="qwen3-vl", input="What is the weather in Paris?", tools=TOOLS, max_output_tokens=64)
    made = client.responses.create(**asked, tool_choice="required", parallel_tool_calls=False, temperature=0.0)
    (call,) = [item for item in made.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    events = list(
        client.responses.create(
            **asked, tool_choice="required", parallel_tool_calls=False, temperature=0.0, stream=True
        )
    )
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [(e.arguments, e.name) for e in done] == [(call.arguments, call.name)]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments
    answer = client.responses.create(
        model="qwen3-vl",
        previous_response_id=made.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}],
        tools=TOOLS,
        max_output_tokens=8,
        temperature=0.0,
    )
    assert answer.output and answer.usage.output_tokens > 0
    # the same tools and question, then the call and its output: a longer prompt than the first
    assert answer.usage.input_tokens > made.usage.input_tokens
    assert answer.previous_response_id == made.id


@pytest.mark.parametrize(
    ("kwargs", "status", "says"),
    [
        ({"model": "nope"}, 404, "unknown model 'nope'"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning is not supported here"),
        ({"tools": [{"type": "web_search"}]}, 400, "only function tools"),
        ({"model": "llava", "tools": TOOLS}, 400, "tools"),
        ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input[0] must be a message"),
        ({"previous_response_id": "resp_missing"}, 404, "previous response 'resp_missing' not found"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "needs text.format.schema"),
    ],
)
def test_errors_are_in_openais_shape(any_api, kwargs, status, says):
    asked = {"model": "qwen3-vl", "input": "hi", "max_output_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as refused:
        sdk(any_api).responses.create(**asked)
    assert refused.value.status_code == status
    body = refused.value.body
    assert set(body) >= {"message", "type", "code"} and says in body["message"], body
