"""The OpenAI route's sampling options with the official openai SDK, on both backends
(issue 18): each assertion fails if its parameter were ignored."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fastapi_app.test_openai_api import sdk, vision_messages


def ask(api, png, **kwargs):
    options = {"model": "llava", "messages": vision_messages(png), "max_tokens": 16, "temperature": 0.0}
    return sdk(api).chat.completions.create(**{**options, **kwargs})


def test_the_same_seed_gives_the_same_text_and_another_seed_another(any_api, png):
    first = ask(any_api, png, temperature=1.0, seed=21).choices[0].message.content
    assert ask(any_api, png, temperature=1.0, seed=21).choices[0].message.content == first
    others = [ask(any_api, png, temperature=1.0, seed=s).choices[0].message.content for s in (22, 23)]
    assert any(other != first for other in others)


def test_both_backends_give_the_same_text_for_a_seed(api, local_api, png):
    texts = [ask(a, png, temperature=1.0, seed=8).choices[0].message.content for a in (api, local_api)]
    assert texts[0] == texts[1]


def test_a_stop_string_ends_the_answer_before_it_streamed_and_not(any_api, png):
    full = ask(any_api, png, max_tokens=32).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    whole = ask(any_api, png, max_tokens=32, stop=[stop])
    assert whole.choices[0].message.content == full[: full.index(stop)].rstrip()
    assert whole.choices[0].finish_reason == "stop"
    chunks = ask(any_api, png, max_tokens=32, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_a_frequency_penalty_changes_a_greedy_answer(any_api, png):
    plain = ask(any_api, png, max_tokens=48).choices[0].message.content
    assert ask(any_api, png, max_tokens=48, frequency_penalty=2.0).choices[0].message.content != plain
    assert ask(any_api, png, max_tokens=48, frequency_penalty=0.0).choices[0].message.content == plain


def test_logprobs_of_a_greedy_answer_streamed_and_not(any_api, png):
    whole = ask(any_api, png, max_tokens=8, logprobs=True, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs) and len(entry.top_logprobs) == 3
    assert ask(any_api, png, max_tokens=8).choices[0].logprobs is None
    chunks = list(ask(any_api, png, max_tokens=8, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content][: len(streamed)] and len(streamed) >= 6


def test_include_usage_sends_a_last_chunk_with_no_choices(any_api, png):
    chunks = list(ask(any_api, png, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ],
)
def test_bad_values_are_a_400_that_names_the_parameter(any_api, png, kwargs, says):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, **kwargs)
    assert says in json.dumps(caught.value.body)


def test_moondream2_refuses_what_it_cannot_honour(any_api, png):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, model="moondream2", seed=3)
    assert "moondream2 does not support seed" in json.dumps(caught.value.body)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, model="moondream2", frequency_penalty=0.5)
    assert "frequency_penalty" in json.dumps(caught.value.body)
    # the values that ask for nothing are taken, as the OpenAPI document says
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logprobs": False, "stop": []}
    assert ask(any_api, png, model="moondream2", **neutral).choices[0].finish_reason in ("stop", "length")


def test_a_logit_bias_of_100_makes_every_token_that_token(any_api, png, tiny_models_dir):
    from transformers import AutoTokenizer

    (x,) = AutoTokenizer.from_pretrained(tiny_models_dir / "llava").encode("x", add_special_tokens=False)
    assert "x" not in ask(any_api, png, max_tokens=6).choices[0].message.content
    forced = ask(any_api, png, max_tokens=6, logit_bias={str(x): 100}, logprobs=True)
    assert forced.choices[0].message.content == "x" * 6
    assert [entry.token for entry in forced.choices[0].logprobs.content] == ["x"] * 6
    chunks = ask(any_api, png, max_tokens=6, logit_bias={str(x): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "x" * 6
    sampled = ask(any_api, png, max_tokens=6, logit_bias={str(x): 100, "5": -100}, temperature=1.0, seed=1)
    assert sampled.choices[0].message.content == "x" * 6  # sampled answers too


@pytest.mark.parametrize(
    ("logit_bias", "says"),
    [
        ({"50": 150}, 'logit_bias[\\"50\\"] must be a number from -100 to 100, got 150'),
        ({"50": -100.5}, "must be a number from -100 to 100, got -100.5"),
        ({"abc": 1}, 'logit_bias keys must be token ids, integers from 0 written in decimal (e.g. \\"50\\")'),
        ({"-3": 1}, "logit_bias keys must be token ids"),
        ({"50": "high"}, "logit_bias.50"),
        ({"100000": 1}, "logit_bias has token id(s) outside llava's vocabulary: 100000 (vocabulary size 791"),
        ({str(i): 1 for i in range(1025)}, "logit_bias: Dictionary should have at most 1024 items"),
    ],
)
def test_bad_logit_biases_are_a_400_that_says_why(any_api, png, logit_bias, says):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, logit_bias=logit_bias)
    assert says in json.dumps(caught.value.body)


def test_moondream2_refuses_a_logit_bias_but_takes_an_empty_one(any_api, png):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, model="moondream2", logit_bias={"5": 1})
    assert "moondream2 does not support logit_bias" in json.dumps(caught.value.body)
    assert ask(any_api, png, model="moondream2", logit_bias={}, max_tokens=2).choices[0].finish_reason


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"functions": [{"name": "f"}]}, "functions is not supported here: the legacy functions API"),
        ({"modalities": ["text", "audio"]}, "modalities is not supported here"),
        ({"colour": "blue"}, "unrecognized request argument supplied: colour"),
    ],
)
def test_fields_that_cannot_be_honoured_are_refused_not_ignored(any_api, png, extra, says):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, extra_body=extra)
    assert says in json.dumps(caught.value.body)


def test_openai_fields_that_change_nothing_are_accepted(any_api, png):
    reply = ask(any_api, png, user="u-1", metadata={"team": "a"}, store=False, max_tokens=3)
    assert reply.choices[0].message.content is not None
