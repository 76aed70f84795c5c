"""``/v1/completions`` and ``/v1/models/{id}`` with the official openai SDK, on both backends
(issue 26): a prompt read as written (no chat template), several prompts and n, echo, stop,
seed, integer logprobs, logit_bias, streaming, and the refusals. Answers are gibberish."""

from __future__ import annotations

import openai
import pytest

from tests.fastapi_app.test_openai_api import sdk

TEXT_MODELS = ["kosmos2", "llava", "qwen3-vl"]  # moondream2's own code writes its prompts


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_a_prompt_is_continued_as_written(any_api, model):
    client = sdk(any_api)
    done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0.0)
    (choice,) = done.choices
    assert done.object == "text_completion" and choice.text and choice.finish_reason in ("stop", "length")
    assert 0 < done.usage.completion_tokens <= 6
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=6, temperature=0.0
    )
    # no chat template around the prompt: fewer prompt tokens than the same text as a chat turn
    assert done.usage.prompt_tokens < chat.usage.prompt_tokens
    streamed = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=6, temperature=0.0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_several_prompts_n_answers_each_and_echo(any_api):
    client = sdk(any_api)
    prompts = ["Once upon a time", "The weather today"]
    alone = [
        client.completions.create(model="qwen3-vl", prompt=p, max_tokens=4, temperature=0.0).choices[0].text
        for p in prompts
    ]
    done = client.completions.create(model="qwen3-vl", prompt=prompts, max_tokens=4, temperature=0.0, n=2, echo=True)
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert [c.text for c in done.choices] == [prompts[0] + alone[0]] * 2 + [prompts[1] + alone[1]] * 2


def test_stop_seed_and_logprobs(any_api):
    client = sdk(any_api)
    asked = dict(model="llava", prompt="Tell a story:", max_tokens=16)
    free = client.completions.create(**asked, temperature=0.0).choices[0].text
    stop = free.split()[1]
    cut = client.completions.create(**asked, temperature=0.0, stop=[stop]).choices[0]
    assert cut.text == free[: free.index(stop)].rstrip() and cut.finish_reason == "stop"
    seeded = {client.completions.create(**asked, temperature=1.0, seed=7).choices[0].text for _ in range(2)}
    assert len(seeded) == 1
    scored = client.completions.create(**asked, temperature=0.0, logprobs=2).choices[0]
    lp = scored.logprobs
    assert "".join(lp.tokens).strip() == scored.text.strip() or "".join(lp.tokens).startswith(scored.text[:3])
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_logit_bias_forces_a_token(any_api, tiny_models_dir):
    from transformers import AutoTokenizer

    (x,) = AutoTokenizer.from_pretrained(tiny_models_dir / "llava").encode("x", add_special_tokens=False)
    client = sdk(any_api)
    done = client.completions.create(
        model="llava", prompt="Hello", max_tokens=4, temperature=0.0, logit_bias={str(x): 100}, logprobs=0
    )
    assert done.choices[0].text == "xxxx" and done.choices[0].logprobs.tokens == ["x"] * 4


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"suffix": "end"}, "suffix is not supported here"),
        ({"best_of": 2}, "best_of is not supported here"),
        ({"echo": True, "logprobs": 1}, "echo with logprobs is not supported here"),
        ({"model": "moondream2"}, "moondream2 does not take raw prompts"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
    ],
)
def test_what_cannot_be_honoured_is_a_400(any_api, kwargs, says):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(any_api).completions.create(**{"model": "llava", "prompt": "Hi", "max_tokens": 2, **kwargs})
    assert says in refused.value.body["message"]


def test_one_model_is_retrieved_and_an_unknown_one_is_a_404(any_api):
    client = sdk(any_api)
    model = client.models.retrieve("llava")
    assert model.id == "llava" and model.object == "model" and model.model_extra["ready"] is True
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
