"""Structured output in the in-flight scheduler (issue 18): a grammar per row through
llguidance. The tiny checkpoints have random weights, so an answer that parses and validates
is the grammar's doing; rows without a guide next to guided ones keep their own answers."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.errors import GuideNotWritable, InvalidParameter

MODELS = ["llava", "qwen3-vl", "kosmos2"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "bird"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-c]{2,4}"
CHOICES = ["yes", "no", "a cat on a mat"]


@pytest.fixture(scope="module")
def engines(tiny_models_dir):
    loaded = {name: make_engine(tiny_models_dir, name) for name in MODELS}
    yield loaded
    for engine in loaded.values():
        engine.close()


def guided(engine, i, guide, temperature=0.0, seed=None, max_tokens=96):
    sampling = {"guide": guide} | ({"seed": seed} if seed is not None else {})
    return prepare(engine, i, max_tokens, temperature, sampling=sampling)


@pytest.mark.parametrize("model", MODELS)
def test_schema_regex_and_choice_answers_match_greedy_and_sampled(engines, model):
    engine = engines[model]
    for temperature, seed in ((0.0, None), (1.0, 3), (1.0, 4)):
        batch = [
            guided(engine, 0, {"json_schema": SCHEMA}, temperature, seed),
            guided(engine, 1, {"regex": REGEX}, temperature, seed),
            guided(engine, 2, {"choice": CHOICES}, temperature, seed),
        ]
        answer, code, choice = engine.generate(batch)
        jsonschema.validate(json.loads(answer.text), SCHEMA)
        assert re.fullmatch(REGEX, code.text), code.text
        assert choice.text in CHOICES
        assert {r.finish_reason for r in (answer, code, choice)} == {"stop"}


@pytest.mark.parametrize("model", MODELS)
def test_guided_rows_and_free_rows_share_steps_and_keep_their_solo_answers(engines, model):
    engine = engines[model]
    free_alone = [engine.generate([prepare(engine, i, 24)])[0].text for i in (3, 4)]
    schema_alone = engine.generate([guided(engine, 5, {"json_schema": SCHEMA})])[0].text
    assert not any(text.startswith("{") for text in free_alone)  # the guide is not everyone's
    free = [Request(engine, prepare(engine, i, 24)) for i in (3, 4)]
    free[0].first_text()  # the guided row joins a running batch
    schema = Request(engine, guided(engine, 5, {"json_schema": SCHEMA}))
    assert [r.result().text for r in free] == free_alone
    assert schema.result().text == schema_alone


def test_json_object_answers_are_objects(engines):
    engine = engines["qwen3-vl"]
    results = engine.generate([guided(engine, i, {"json_object": True}, 1.0, i, 160) for i in range(8)])
    assert all(r.text.startswith("{") for r in results)
    finished = [r for r in results if r.finish_reason == "stop"]
    assert finished, [r.text for r in results]
    for result in finished:
        assert isinstance(json.loads(result.text), dict)


@pytest.mark.parametrize(
    ("guide", "says"),
    [
        ({"regex": "a("}, "regex"),
        ({"json_schema": {"type": "strange"}}, "json schema"),
        ({"json_schema": {"if": []}}, "Unimplemented keys"),  # a keyword llguidance lacks: said as such
        ({"json_schema": {"type": "object"}, "regex": "x"}, "exactly one"),
        ({"choice": []}, "choice"),
        ({"json_object": "yes"}, "json_object"),
        ({"grammar": "start: x"}, "exactly one of"),
    ],
)
def test_a_bad_guide_is_refused_before_it_is_queued(engines, guide, says):
    engine = engines["llava"]
    with pytest.raises(InvalidParameter) as caught:
        guided(engine, 0, guide)
    assert says in str(caught.value)


def test_a_guide_the_vocabulary_cannot_write_is_refused_and_fails_alone(engines):
    # Kosmos-2's vocabulary (sentencepiece, no byte fallback; the tiny one has 1393 pieces) has
    # no token for "\u00cc": llguidance then allows only end-of-sequence, and a row that took it
    # used to end as a server error ("ended before the grammar was complete")
    engine = engines["kosmos2"]
    for choices in (["\u00cc"], ["\u00cca"], ["\u00cc", "\u00e9"]):
        with pytest.raises(GuideNotWritable) as caught:
            guided(engine, 0, {"choice": choices})
        assert caught.value.status == 400 and "cannot be written" in str(caught.value)
    # a choice that starts well and meets the character later fails as the client's error
    # (400), alone: its neighbour in the same steps keeps its solo answer
    free_alone = engine.generate([prepare(engine, 3, 24)])[0].text
    free = Request(engine, prepare(engine, 3, 24))
    stuck = Request(engine, guided(engine, 1, {"choice": ["a\u00cc"]}))
    with pytest.raises(GuideNotWritable) as caught:
        stuck.result()
    assert caught.value.status == 400 and "vocabulary cannot write" in str(caught.value)
    assert "".join(stuck.texts) == "a"  # the part it could write was streamed
    assert free.result().text == free_alone
