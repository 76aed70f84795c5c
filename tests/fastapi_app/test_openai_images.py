"""Several images through the OpenAI route with the openai SDK, on both backends (issue 18)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fastapi_app.test_openai_api import data_url, sdk
from tests.unit.test_multi_image import BLUE, GREEN, RED


def image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, "image/jpeg" if data is BLUE else "image/png")}}


def ask(api, model, messages):
    return sdk(api).chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.0)


def test_qwen3_vl_two_images_in_one_message_and_llava_images_in_two_turns(any_api):
    both = [{"role": "user", "content": [{"type": "text", "text": "Compare."}, image(RED), image(GREEN)]}]
    other = [{"role": "user", "content": [{"type": "text", "text": "Compare."}, image(RED), image(BLUE)]}]
    answers = [ask(any_api, "qwen3-vl", m).choices[0].message.content for m in (both, other)]
    assert answers[0] != answers[1]  # the second image is seen
    turns = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image(RED)]},
        {"role": "assistant", "content": "A thing."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, image(GREEN)]},
    ]
    assert ask(any_api, "llava", turns).choices[0].message.content


@pytest.mark.parametrize(
    ("model", "count", "status", "says"),
    [("kosmos2", 2, 400, "kosmos2 takes at most 1 image"), ("qwen3-vl", 5, 413, "at most 4 images")],
)
def test_more_images_than_a_model_takes(any_api, model, count, status, says):
    parts = [{"type": "text", "text": "Compare."}] + [image(RED)] * count
    with pytest.raises(openai.APIStatusError) as caught:
        ask(any_api, model, [{"role": "user", "content": parts}])
    assert caught.value.status_code == status and says in json.dumps(caught.value.body)
