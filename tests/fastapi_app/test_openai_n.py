"""n answers through the OpenAI route with the official openai SDK, on both backends (issue 18)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fastapi_app.test_openai_api import sdk, vision_messages


def ask(api, png, **kwargs):
    options = {"model": "llava", "messages": vision_messages(png), "max_tokens": 8, "temperature": 1.0, "seed": 3}
    return sdk(api).chat.completions.create(**{**options, **kwargs})


def test_n_choices_streamed_and_not(any_api, png):
    whole = ask(any_api, png, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) == 3
    alone = [ask(any_api, png, seed=3 + i) for i in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]  # answer i is the request alone with seed + i
    tokens = sum(a.usage.completion_tokens for a in alone)
    assert whole.usage.completion_tokens == tokens and whole.usage.prompt_tokens == alone[0].usage.prompt_tokens
    chunks = list(ask(any_api, png, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = {i: "" for i in range(3)}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert [streamed[i] for i in range(3)] == texts and finished == {0, 1, 2}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens


@pytest.mark.parametrize(("kwargs", "says"), [({"n": 5}, "MAX_N"), ({"model": "moondream2", "n": 2}, "n")])
def test_too_many_answers_is_a_400(any_api, png, kwargs, says):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(any_api, png, **kwargs)
    assert says in json.dumps(caught.value.body)
