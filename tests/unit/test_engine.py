"""The shared engine in-process on the tiny checkpoints (the same code Triton runs)."""

from __future__ import annotations

import pytest

from tests.conftest import image_bytes
from vlm_engine.chat import Message, single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import InvalidRequest, PromptTooLong, TooLarge
from vlm_engine.scheduler import CANCEL_CHECK_STEPS
from vlm_engine.settings import resolve_settings

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]


@pytest.fixture(scope="module")
def engines(tiny_models_dir):
    env = {"VLM_MODELS_DIR": str(tiny_models_dir), "MAX_PROMPT_TOKENS": "300"}
    return {name: VLMEngine(resolve_settings(name, env=env)) for name in MODELS}


def _batch(engine, n=4, max_tokens=10):
    prompts = ["What is this?", "Describe the image in detail please.", "Colors?", "How many dogs are in the park?"]
    return [
        engine.prepare(
            single_turn(prompts[i % 4], image_bytes((60 + 40 * i, 50 + 10 * i))), max_tokens=max_tokens, temperature=0.0
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("model", MODELS)
def test_batch_equals_single_and_stream_equals_result(engines, model):
    engine = engines[model]
    together = engine.generate(_batch(engine))
    alone = [engine.generate([p])[0] for p in _batch(engine)]
    assert [r.text for r in together] == [r.text for r in alone]
    streamed: dict[int, list[str]] = {}
    finals = {}
    for chunk in engine.stream(_batch(engine)):
        streamed.setdefault(chunk.index, []).append(chunk.text)
        if chunk.result is not None:
            finals[chunk.index] = chunk.result
    assert sorted(finals) == [0, 1, 2, 3]
    for index, pieces in streamed.items():
        assert "".join(pieces) == finals[index].text == together[index].text


@pytest.mark.parametrize("model", ["llava", "qwen3-vl", "moondream2"])
def test_each_row_keeps_its_own_max_tokens(engines, model):
    engine = engines[model]
    image = image_bytes((64, 64))
    short = engine.prepare(single_turn("Describe it.", image), max_tokens=3, temperature=0.0)
    long = engine.prepare(single_turn("Describe it.", image), max_tokens=12, temperature=0.0)
    results = engine.generate([short, long])
    assert results[0].output_tokens <= 3 < results[1].output_tokens or results[1].finish_reason == "stop"
    assert results[1].text.strip().startswith(results[0].text.strip()[:3]), "same prompt, same greedy start"


def test_a_cancelled_row_stops_without_stopping_the_others(engines):
    engine = engines["llava"]
    image = image_bytes((64, 64))
    cancelled = engine.prepare(
        single_turn("Describe it.", image), max_tokens=40, temperature=0.0, cancelled=lambda: True
    )
    live = engine.prepare(single_turn("Describe it.", image), max_tokens=40, temperature=0.0)
    results = engine.generate([cancelled, live])
    # the housekeeper asks clients (never the loop): a row that left is dropped within the bound
    assert results[0].finish_reason == "cancelled"
    assert results[0].output_tokens <= 2 * CANCEL_CHECK_STEPS + 1
    assert results[1].output_tokens == 40


def test_text_only_chat_and_history(engines):
    for name in MODELS:
        engine = engines[name]
        messages = [
            Message("system", "Be brief."),
            Message("user", "Hello"),
            Message("assistant", "Hi there"),
            Message("user", "What did I say?"),
        ]
        result = engine.generate([engine.prepare(messages, max_tokens=5, temperature=0.0)])[0]
        assert result.output_tokens >= 1, name


def test_request_validation(engines):
    engine = engines["llava"]
    image = image_bytes((32, 32))
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.prepare(single_turn("  ", image))
    with pytest.raises(InvalidRequest, match="no user message"):
        engine.prepare([Message("system", "be brief"), Message("assistant", "hello")])
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.prepare([Message("user", " \t\n", [image]), Message("assistant", "hello")])
    with pytest.raises(InvalidRequest, match="images go in user messages"):
        engine.prepare([Message("user", "hi"), Message("assistant", "look", [image])])
    # OpenAI's shape, not ours to narrow: a conversation may end with the assistant's turn
    ends_with_assistant = engine.prepare([Message("user", "hi", [image]), Message("assistant", "hello")], max_tokens=3)
    assert engine.generate([ends_with_assistant])[0].output_tokens == 3
    with pytest.raises(InvalidRequest, match="kosmos2 takes at most 1 image per request"):
        engines["kosmos2"].prepare([Message("user", "compare", [image, image])])
    with pytest.raises(TooLarge, match=r"llava takes at most 4 images per request \(MAX_IMAGES\)"):
        engine.prepare(
            [Message("user", "compare", [image] * 3), Message("assistant", "ok"), Message("user", "and", [image] * 2)]
        )
    with pytest.raises(PromptTooLong, match="above the limit of 300"):
        engine.prepare(single_turn("word " * 400, image))


def test_sampling_follows_temperature(engines):
    engine = engines["qwen3-vl"]
    image = image_bytes((64, 64))
    texts = {
        engine.generate([engine.prepare(single_turn("Describe.", image), max_tokens=12, temperature=1.5, top_p=1.0)])[
            0
        ].text
        for _ in range(4)
    }
    assert len(texts) > 1, "sampled answers should vary"


def test_kosmos2_streams_the_caption_its_answer_gives(engines):
    """Streamed Kosmos-2 text joins to the answer: tags (``<phrase>``, ``<patch_index_N>``)
    and an unclosed ``<`` are not sent, whatever tokens come (random ids, tags, '<', '>')."""
    import random

    adapter = engines["kosmos2"].adapter
    tokenizer = adapter.tokenizer
    tags = tokenizer.convert_tokens_to_ids(["<phrase>", "</phrase>", "<object>", "</object>", "<patch_index_0007>"])
    brackets = [i for i in range(len(tokenizer)) if set(tokenizer.decode([i]).strip()) & set("<>\n")]
    assert brackets, "the tokenizer should have tokens writing '<' or '>'"
    rng = random.Random(0)
    tagged = 0
    for _ in range(300):
        ids = [rng.choice(rng.choice((tags, brackets, range(5, 360)))) for _ in range(rng.randrange(1, 30))]
        stream = adapter.stream_text()
        sent = ""
        for token in ids:
            sent += stream.push(token)
        answer = adapter.finish(ids, "length").text
        assert answer.startswith(sent), (ids, sent, answer)
        assert sent + stream.flush(answer) == answer
        tagged += any(t in tags for t in ids)
    assert tagged > 100


def test_kosmos2_extracts_entities_with_boxes(engines):
    adapter = engines["kosmos2"].adapter
    tokens = "<phrase> a dog</phrase><object><patch_index_0000><patch_index_1023></object> runs"
    ids = adapter.tokenizer(tokens, add_special_tokens=False)["input_ids"]
    result = adapter.finish(ids, "stop")
    assert result.text == "a dog runs"
    assert result.entities == [{"phrase": "a dog", "span": [0, 5], "boxes": [[0.015625, 0.015625, 0.984375, 0.984375]]}]
