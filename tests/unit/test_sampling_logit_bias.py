"""OpenAI's ``logit_bias``, per row: its checks (``vlm_engine.params``, ``VLMEngine.prepare``), the
sampler adding it (``vlm_engine.sampling.choose``), and answers of the tiny models with it."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.errors import InvalidParameter
from vlm_engine.params import GenerationParams, Sampling, check_logit_bias, resolve_sampling
from vlm_engine.sampling import RowState, choose

VOCAB = 50


def row(temperature: float = 0.0, **sampling) -> GenerationParams:
    return GenerationParams(8, temperature, 1.0, resolve_sampling(sampling))


def scores(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


# -- the sampler


@pytest.mark.parametrize("with_state", [False, True])
def test_a_bias_moves_its_greedy_row_and_no_other(with_state):
    logits = scores(4)
    before = logits.clone()
    best = logits.argmax(-1).tolist()
    forced = (best[0] + 7) % VOCAB  # not row 0's choice
    second = logits[1].topk(2).indices[1].item()
    params = [
        row(logit_bias={str(forced): 100}),  # OpenAI's JSON: string keys
        row(logit_bias={best[1]: -100}),  # int keys too
        row(),  # no bias, between two biased rows
        row(logit_bias={str(best[3]): -100, str(forced): 100}),
    ]
    states = [RowState(p.sampling, (), "cpu") if with_state and p.sampling.logit_bias else None for p in params]
    ids = choose(logits, params, states=states).ids
    assert ids == [forced, second, best[2], forced]
    assert torch.equal(logits, before)  # the model's scores are not written to
    assert choose(logits, [row(), row(), row(), row()]).ids == best  # without biases: the argmax again
    if with_state:  # made once, kept for the row's next steps
        assert states[0].bias is not None and states[0].bias[0].tolist() == [forced]


def test_a_lone_biased_row_and_small_biases_add_to_the_scores():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 1.0
    # +0.5 on token 9 is not enough to beat token 3's lead of 1; +1.5 is
    assert choose(logits, [row(logit_bias={"9": 0.5}), row()]).ids == [3, 3]
    assert choose(logits, [row(), row(logit_bias={"9": 1.5})]).ids == [3, 9]
    assert choose(logits, [row(logit_bias={"9": 1.5, "3": -1})] * 2).ids == [9, 9]


def test_sampled_rows_honour_the_bias_too():
    logits = scores(2, seed=3)
    generator = torch.Generator().manual_seed(0)
    banned = logits[0].topk(5).indices.tolist()
    for _ in range(50):
        ids = choose(
            logits,
            [row(1.0, logit_bias={str(t): -100 for t in banned}), row(1.0, logit_bias={"11": 100})],
            generator,
        ).ids
        assert ids[0] not in banned and ids[1] == 11


def test_penalties_apply_after_the_bias():
    """Token 5 (+10) leads token 6 (+9); a frequency penalty of 2 per use hands the lead to 6
    once 5 has been written. The order is vLLM's (biases, then penalties): a repetition penalty
    divides a biased score."""
    params = [row(logit_bias={"5": 10, "6": 9}, frequency_penalty=2.0)]
    state = RowState(params[0].sampling, (), "cpu")
    logits = torch.zeros(1, VOCAB)
    assert [choose(logits, params, states=[state]).ids[0] for _ in range(2)] == [5, 6]
    # the repetition penalty divides a seen token's biased score: 10 / 2 < 6 (penalised first, 0 + 10 > 6)
    params = [row(logit_bias={"5": 10, "6": 6}, repetition_penalty=2.0)]
    assert choose(logits, params, states=[RowState(params[0].sampling, [5], "cpu")]).ids == [6]


def test_logprobs_stay_the_models_own():
    logits = scores(1)
    plain = choose(logits, [row(logprobs=True, top_logprobs=2)]).logprobs[0]
    forced = (logits.argmax().item() + 1) % VOCAB
    biased = choose(logits, [row(logprobs=True, top_logprobs=2, logit_bias={str(forced): 100})]).logprobs[0]
    assert biased.token == forced
    assert biased.top == plain.top  # the model's distribution, not the biased one
    assert math.isclose(biased.logprob, torch.log_softmax(logits[0], -1)[forced].item(), abs_tol=1e-6)


# -- the checks


def test_logit_bias_is_resolved_to_sorted_int_pairs():
    assert resolve_sampling({"logit_bias": {"50": -100, "7": 2.5, 0: 100}}).logit_bias == (
        (0, 100.0),
        (7, 2.5),
        (50, -100.0),
    )
    assert resolve_sampling({"logit_bias": {}}) == Sampling()  # asks for nothing
    assert resolve_sampling({"logit_bias": None}) == Sampling()
    assert len(resolve_sampling({"logit_bias": {str(i): 1 for i in range(1024)}}).logit_bias) == 1024


@pytest.mark.parametrize(
    ("bias", "says"),
    [
        ({"abc": 1}, 'logit_bias keys must be token ids, integers from 0 written in decimal (e.g. "50"), got "abc"'),
        ({"-1": 1}, 'got "-1"'),
        ({"07": 1}, 'got "07"'),  # one token, one key
        ({"1.5": 1}, 'got "1.5"'),
        ({" 5": 1}, 'got " 5"'),
        ({-3: 1}, "got -3"),
        ({True: 1}, "got true"),
        ({"9" * 19: 1}, "integers from 0 written in decimal"),
        ({"50": 101}, 'logit_bias["50"] must be a number from -100 to 100, got 101'),
        ({"50": -100.5}, "got -100.5"),
        ({"50": "5"}, 'got "5"'),
        ({"50": True}, "got true"),
        ({"50": float("nan")}, "got NaN"),
        ({"50": None}, "got null"),
        ({5: 1, "5": 2}, "logit_bias names token 5 twice"),
        ({str(i): 1 for i in range(1025)}, "logit_bias takes at most 1024 token ids, got 1025"),
        ([[50, 1]], "logit_bias must be an object of token ids to biases"),
        ("50", "got str"),
    ],
)
def test_bad_biases_are_refused_with_the_key_named(bias, says):
    with pytest.raises(InvalidParameter) as caught:
        resolve_sampling({"logit_bias": bias})
    assert says in str(caught.value)


def test_ids_outside_the_vocabulary_are_refused_with_its_size():
    sampling = resolve_sampling({"logit_bias": {"790": 1, "791": 1, "5000": -1}})
    check_logit_bias(resolve_sampling({"logit_bias": {"790": 1}}), 791, "llava")
    with pytest.raises(InvalidParameter) as caught:
        check_logit_bias(sampling, 791, "llava")
    assert str(caught.value) == (
        "logit_bias has token id(s) outside llava's vocabulary: 791, 5000 (vocabulary size 791: ids 0 to 790)"
    )


# -- the tiny models


@pytest.fixture(scope="module")
def llava(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", IGNORE_EOS="true")
    yield engine
    engine.close()


def token_id(engine, text: str) -> int:
    tokenizer = AutoTokenizer.from_pretrained(engine.settings.model_path)
    (token,) = tokenizer.encode(text, add_special_tokens=False)
    return token


def answer(engine, i: int, max_tokens: int, temperature: float = 0.0, **sampling):
    return engine.generate([prepare(engine, i, max_tokens, temperature, sampling=sampling)])[0]


def test_a_forced_and_a_banned_token_in_one_batch_beside_a_plain_row(llava):
    x = token_id(llava, "x")
    plain = [answer(llava, i, 12, logprobs=True) for i in (1, 2, 3)]
    first = plain[1].logprobs[0]["token"]
    assert "x" not in plain[0].text, "the test needs an answer without x"
    first_ids = llava.adapter.tokenizer.encode(first, add_special_tokens=False)
    assert len(first_ids) == 1, f"the test needs a first token that is one token as text: {first!r}"
    first_id = first_ids[0]
    rows = [
        Request(llava, prepare(llava, 1, 12, sampling={"logit_bias": {str(x): 100}, "logprobs": True})),
        Request(llava, prepare(llava, 2, 12, sampling={"logit_bias": {str(first_id): -100}, "logprobs": True})),
        Request(llava, prepare(llava, 3, 12, sampling={"logprobs": True})),
    ]
    forced, banned, unchanged = (r.result() for r in rows)
    assert forced.text == "x" * 12 and [e["token"] for e in forced.logprobs] == ["x"] * 12
    assert banned.logprobs[0]["token"] != first and banned.text != plain[1].text
    assert unchanged.text == plain[2].text


def test_a_sampled_row_with_a_seed_is_forced_too(llava):
    x = token_id(llava, "x")
    assert answer(llava, 1, 6, 1.5, seed=3, logit_bias={str(x): 100}).text == "x" * 6


def test_the_guide_still_constrains_a_biased_row(llava):
    x = token_id(llava, "x")
    guided = answer(llava, 2, 16, guide={"choice": ["yes", "no"]}, logit_bias={str(x): 100})
    assert guided.text in ("yes", "no")
    other = "no" if guided.text == "yes" else "yes"
    toward = token_id(llava, other[0])  # the other choice's first letter: the grammar allows it
    assert answer(llava, 2, 16, guide={"choice": ["yes", "no"]}, logit_bias={str(toward): 100}).text == other


def test_the_engine_refuses_ids_past_the_models_vocabulary(llava, tiny_models_dir):
    size = llava.adapter.text_config().vocab_size
    prepare(llava, 1, 4, sampling={"logit_bias": {str(size - 1): 5}})
    with pytest.raises(InvalidParameter, match=f"outside llava's vocabulary: {size} .vocabulary size {size}"):
        prepare(llava, 1, 4, sampling={"logit_bias": {str(size): 5}})
    moondream = make_engine(tiny_models_dir, "moondream2", WARMUP="false")
    try:
        with pytest.raises(InvalidParameter, match="moondream2 does not support logit_bias"):
            prepare(moondream, 1, 4, sampling={"logit_bias": {"5": 1}})
        prepare(moondream, 1, 4, sampling={"logit_bias": {}})  # asks for nothing
    finally:
        moondream.close()
