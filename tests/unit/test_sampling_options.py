"""Per-row sampling options in the in-flight scheduler (issue 18): seed, stop strings,
penalties, logprobs; each row gets what it gets alone, whatever else is in the batch."""

from __future__ import annotations

import math

import pytest

from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.errors import InvalidParameter

MODELS = ["llava", "qwen3-vl", "kosmos2"]


@pytest.fixture(scope="module")
def engines(tiny_models_dir):
    loaded = {name: make_engine(tiny_models_dir, name, IGNORE_EOS="true") for name in MODELS}
    yield loaded
    for engine in loaded.values():
        engine.close()


def alone(engine, i, max_tokens, temperature=0.0, **sampling):
    return engine.generate([prepare(engine, i, max_tokens, temperature, sampling=sampling)])[0]


# the tiny Kosmos-2 samples dots and question marks below temperature 2
HOT = {"llava": 1.0, "qwen3-vl": 1.0, "kosmos2": 2.0}


@pytest.mark.parametrize("model", MODELS)
def test_a_seed_gives_the_same_text_alone_and_in_a_batch_and_another_seed_another(engines, model):
    engine, hot = engines[model], HOT[model]
    first = alone(engine, 1, 24, hot, seed=7).text
    assert alone(engine, 1, 24, hot, seed=7).text == first
    assert alone(engine, 1, 24, hot, seed=8).text != first
    crowd = [Request(engine, prepare(engine, i, 24, hot)) for i in (2, 3)]
    seeded = Request(engine, prepare(engine, 1, 24, hot, sampling={"seed": 7}))
    assert seeded.result().text == first
    for request in crowd:
        request.result()


@pytest.mark.parametrize("model", MODELS)
def test_a_stop_string_ends_the_answer_before_it(engines, model):
    engine = engines[model]
    full = alone(engine, 2, 40).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and stop in full
    cut = full[: full.index(stop)].rstrip()
    request = Request(engine, prepare(engine, 2, 40, sampling={"stop": ["never appears", stop]}))
    result = request.result()  # also: streamed chunks join to the answer
    assert result.text == cut and result.finish_reason == "stop"
    assert result.output_tokens < 40
    assert result.stop_sequence == stop  # named (Anthropic's stop_sequence)
    assert alone(engine, 2, 40).stop_sequence is None


@pytest.mark.parametrize("model", ["llava", "qwen3-vl"])
def test_a_stop_string_that_ends_in_whitespace_is_named_and_leaks_nothing(engines, model):
    """The final text is stripped, so "word " is no longer in it: the stop found while
    streaming is the one reported, where it was found."""
    engine = engines[model]
    full = alone(engine, 2, 40).text
    at = full.find(" ", len(full) // 3)
    assert at > 0, f"the test needs an answer with a space: {full!r}"
    start = full.rfind(" ", 0, at) + 1
    stop = full[start : at + 1]  # a word and the space after it
    result = Request(engine, prepare(engine, 2, 40, sampling={"stop": [stop]})).result()
    assert result.stop_sequence == stop and result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)].rstrip()


@pytest.mark.parametrize("model", ["llava", "qwen3-vl"])
def test_top_k_1_samples_the_greedy_answer(engines, model):
    engine = engines[model]
    greedy = alone(engine, 1, 16).text
    assert alone(engine, 1, 16, 1.0, top_k=1, seed=3).text == greedy
    assert alone(engine, 1, 16, 1.0, seed=3).text != greedy  # sampling without it differs here


def test_penalties_change_a_repetitive_greedy_answer(engines):
    engine = engines["llava"]
    plain = alone(engine, 0, 48, logprobs=True)
    tokens = [entry["token"] for entry in plain.logprobs]
    assert len(set(tokens)) < 0.8 * len(tokens), "the test needs an answer that repeats its tokens"
    assert alone(engine, 0, 48, frequency_penalty=2.0).text != plain.text
    assert alone(engine, 0, 48, presence_penalty=2.0).text != plain.text
    assert alone(engine, 0, 48, repetition_penalty=1.8).text != plain.text
    assert alone(engine, 0, 48, frequency_penalty=0.0).text == plain.text


@pytest.mark.parametrize("model", MODELS)
def test_logprobs_of_a_greedy_row_are_the_top_of_its_distribution(engines, model):
    engine = engines[model]
    result = alone(engine, 3, 12, logprobs=True, top_logprobs=3)
    assert len(result.logprobs) == result.output_tokens == 12
    for entry in result.logprobs:
        top = entry["top_logprobs"]
        assert len(top) == 3 and top[0]["token"] == entry["token"]
        assert math.isclose(entry["logprob"], top[0]["logprob"], abs_tol=1e-5)
        assert top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"] and entry["logprob"] <= 0
        assert entry["bytes"] == list(entry["token"].encode())
    assert alone(engine, 3, 12).logprobs is None


def test_a_mixed_batch_gives_every_row_its_answer_alone(engines):
    engine = engines["qwen3-vl"]
    kinds = [
        (1, 1.0, {"seed": 11}),
        (2, 0.0, {"frequency_penalty": 1.5}),
        (3, 0.0, {}),
        (4, 0.0, {"stop": ["e"]}),
        (5, 0.0, {"logprobs": True, "top_logprobs": 2}),
    ]
    expected = [alone(engine, i, 20, t, **s) for i, t, s in kinds]
    together = [Request(engine, prepare(engine, i, 20, t, sampling=s)) for i, t, s in kinds]
    results = [r.result() for r in together]
    assert [r.text for r in results] == [r.text for r in expected]
    batched, single = results[4].logprobs, expected[4].logprobs
    assert [e["token"] for e in batched] == [e["token"] for e in single]
    assert all(math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4) for a, b in zip(batched, single, strict=True))


def test_a_preempted_seeded_row_finishes_with_its_text_alone(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", IGNORE_EOS="true", KV_CACHE_MB="2")
    try:
        expected = [alone(engine, i, 120, 1.0, seed=i).text for i in range(6)]
        together = [Request(engine, prepare(engine, i, 120, 1.0, sampling={"seed": i})) for i in range(6)]
        assert [r.result().text for r in together] == expected
        assert engine.scheduler.stats.preempted > 0
    finally:
        engine.close()


def test_bad_values_and_unsupported_models_are_refused(engines, tiny_models_dir):
    engine = engines["llava"]
    for sampling, word in (
        ({"stop": ["a"] * 5}, "stop"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_logprobs": 3}, "logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"seed": "x"}, "seed"),
    ):
        with pytest.raises(InvalidParameter, match=word):
            prepare(engine, 1, 4, sampling=sampling)
    moondream = make_engine(tiny_models_dir, "moondream2", WARMUP="false")
    try:
        with pytest.raises(InvalidParameter, match="moondream2 does not support seed"):
            prepare(moondream, 1, 4, sampling={"seed": 1})
    finally:
        moondream.close()


def test_an_extreme_repetition_penalty_still_samples(engines):
    """5e-324 is 0 in float32: the scores stay finite and the row answers."""
    result = alone(engines["llava"], 1, 8, 2.0, repetition_penalty=5e-324, seed=1)
    assert result.output_tokens == 8
