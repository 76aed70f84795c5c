"""KV pages shared by hash (prefix caching), kept clean, and always given back.

- A request whose prompt starts like an earlier one (a chat's next turn, the same question
  again) starts on the cached pages and prefills only the rest; its answer is the one a cold
  cache gives.
- Values an earlier row left in pages (NaN included) never reach a later row.
- Every way a row can end gives every page reference back.
"""

from __future__ import annotations

import queue

import pytest

from tests.conftest import image_bytes
from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.chat import Message
from vlm_engine.errors import EngineError

PAGED = ["llava", "kosmos2", "qwen3-vl"]
IMAGE = image_bytes((120, 96), "PNG", (200, 60, 30))
# long enough that a hit can end after the image (a hit never ends inside one: Kosmos-2's
# 64 image tokens fill its first pages)
QUESTION = "What is in the picture? Describe the colours, the shapes, and where each thing is, one by one."
OTHER = image_bytes((120, 96), "PNG", (30, 60, 200))


def turns(*texts: str, image: bytes = IMAGE) -> list[Message]:
    """A chat: the first user turn carries the image; the assistant's answers are given."""
    messages = []
    for i, text in enumerate(texts):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append(Message(role, text, [image] if i == 0 else []))
    return messages


def ask(engine, messages: list[Message], tokens: int = 16):
    prepared = engine.prepare(messages, tokens, 0.0)
    before = engine.scheduler.stats.prefill_tokens
    result = Request(engine, prepared).result()
    return result.text, engine.scheduler.stats.prefill_tokens - before, engine.adapter.prefill_cost(prepared)


def assert_pages_back(engine) -> None:
    pages = engine.adapter.kv.pages
    assert pages.used_pages == 0, "every page came back"
    assert not any(pages.refs), "no reference is left"
    assert pages.free_pages == pages.num_pages - 1


@pytest.fixture(scope="module")
def pair(tiny_models_dir):
    """Per model: an engine that caches prefixes and one that does not."""
    loaded = {
        model: (
            make_engine(tiny_models_dir, model, WARMUP="false", IGNORE_EOS="true"),
            make_engine(tiny_models_dir, model, WARMUP="false", IGNORE_EOS="true", PREFIX_CACHING="false"),
        )
        for model in PAGED
    }
    yield loaded
    for engines in loaded.values():
        for engine in engines:
            engine.close()


@pytest.mark.parametrize("model", PAGED)
def test_a_chats_next_turn_prefills_only_its_new_tokens_and_answers_as_from_a_cold_cache(pair, model):
    cached, cold = pair[model]
    size = cached.adapter.kv.page_size
    first, _, _ = ask(cached, turns(QUESTION))
    assert first == ask(cold, turns(QUESTION))[0]
    chat = turns(QUESTION, first, "And what colour is it?")
    hits = cached.adapter.kv.pages.stats.hit_tokens
    answer, prefilled, prompt = ask(cached, chat)
    assert answer == ask(cold, chat)[0], "a prefix hit gives the cold cache's answer"
    hit = cached.adapter.kv.pages.stats.hit_tokens - hits
    assert hit > 0 and prefilled == prompt - hit
    # the first turn's prompt (image included) is all in the cache, but for its last page
    first_prompt = cached.adapter.prefill_cost(cached.prepare(turns(QUESTION), 4))
    assert hit >= (first_prompt // size - 1) * size
    # the same chat again: everything but the page holding the last prompt token is shared
    again, prefilled, prompt = ask(cached, chat)
    assert again == answer and prefilled <= size
    assert_pages_back(cached)


@pytest.mark.parametrize("model", PAGED)
def test_another_image_in_the_same_place_is_not_a_hit(pair, model):
    cached, cold = pair[model]
    ask(cached, turns("Describe it.", image=IMAGE))
    answer, prefilled, prompt = ask(cached, turns("Describe it.", image=OTHER))
    assert answer == ask(cold, turns("Describe it.", image=OTHER))[0]
    inputs = cached.prepare(turns("Describe it.", image=OTHER), 4).inputs
    first_image_token = int(cached.adapter.image_mask({k: v[0] for k, v in inputs.items()}).nonzero()[0])
    assert prefilled >= prompt - first_image_token, "nothing from the image on is shared"


@pytest.mark.parametrize("model", PAGED)
def test_an_image_asked_about_again_shares_its_pages_whatever_the_question(pair, model):
    """The same image with another question: the pages up to the question are shared (the
    hit may end inside the image; the rest of its tokens take their slice of the cached
    encoder output), and the answer is the cold cache's."""
    cached, cold = pair[model]
    size = cached.adapter.kv.page_size
    ask(cached, turns("Describe it, please.", image=OTHER))
    encoded = cached.adapter.vision_encoded
    answer, prefilled, prompt = ask(cached, turns("Which colour is the sky here?", image=OTHER))
    assert answer == ask(cold, turns("Which colour is the sky here?", image=OTHER))[0]
    inputs = cached.prepare(turns("Which colour is the sky here?", image=OTHER), 4).inputs
    image_end = int(cached.adapter.image_mask({k: v[0] for k, v in inputs.items()}).nonzero()[-1]) + 1
    assert prompt - prefilled >= image_end // size * size, "every page up to the question was shared"
    assert cached.adapter.vision_encoded == encoded, "the image did not go through the encoder again"


@pytest.mark.parametrize("attention", ["auto", "gather"])
def test_nan_left_in_free_pages_never_reaches_a_later_request(tiny_models_dir, attention):
    """Pages an earlier row used (and the pool's null page) hold NaN; new rows, decoding
    together with rows of other lengths, still get their clean answers, whether decode
    attention reads pages in place (never past a row's length) or gathers them (masked
    slots: zeroed when the page was handed out)."""
    engine = make_engine(
        tiny_models_dir,
        "llava",
        WARMUP="false",
        IGNORE_EOS="true",
        PREFIX_CACHING="false",
        PAGED_ATTENTION=attention,
    )
    try:
        expected = [engine.generate([prepare(engine, i, 24)])[0].text for i in (0, 3)]
        kv = engine.adapter.kv
        assert kv.pages.used_pages == 0
        for pool in (*kv.keys, *kv.values):
            pool.fill_(float("nan"))  # every page: free ones and the null page
        together = [Request(engine, prepare(engine, i, 24)) for i in (0, 3)]
        assert [r.result().text for r in together] == expected
    finally:
        engine.close()


def test_pages_come_back_after_every_way_a_row_ends(tiny_models_dir, monkeypatch):
    """Finished, cancelled, failed at start, failed in its prefill, preempted (small pool),
    n > 1 (shared pages): afterwards no page is held and every page can be taken."""
    engine = make_engine(tiny_models_dir, "llava", KV_CACHE_MB="2", IGNORE_EOS="true", MAX_N="3")
    try:
        adapter = engine.adapter
        start, step = adapter.start, adapter.step
        doomed_start, doomed_prefill = prepare(engine, 4, 8), prepare(engine, 5, 8)

        def failing_start(prepared, generated):
            if prepared is doomed_start:
                raise RuntimeError("injected: the row fails as it starts")
            return start(prepared, generated)

        def failing_step(decodes, chunks):
            if any(seq.params is doomed_prefill.params for seq, _, _ in chunks):
                raise RuntimeError("injected: the row's prefill fails")
            return step(decodes, chunks)

        monkeypatch.setattr(adapter, "start", failing_start)
        monkeypatch.setattr(adapter, "step", failing_step)
        gone = {"now": False}
        leaving = engine.prepare(turns("Tell me everything."), 400, 0.0, cancelled=lambda: gone["now"])
        answers: queue.Queue = queue.Queue()
        engine.submit(prepare(engine, 7, 30, temperature=1.0, n=3), answers.put)
        requests = {
            "finished": Request(engine, prepare(engine, 0, 200)),
            # each row nearly fills the pool alone (its prompt and 600 tokens): any two together preempt
            "preempted": [Request(engine, prepare(engine, i, 600)) for i in (1, 2, 3, 6)],
            "cancelled": Request(engine, leaving),
        }
        requests["cancelled"].first_text()
        gone["now"] = True
        with pytest.raises(EngineError, match="fails as it starts"):
            Request(engine, doomed_start).result()
        with pytest.raises(EngineError, match="prefill fails"):
            Request(engine, doomed_prefill).result()
        requests["finished"].result()
        for request in requests["preempted"]:
            request.result()
        assert requests["cancelled"].result().finish_reason == "cancelled"
        finals = 0
        while finals < 3:
            event = answers.get(timeout=60)
            assert event.error is None, event.error
            finals += event.final
        assert engine.scheduler.stats.preempted > 0, "the pool was small enough to preempt"
        engine.close()  # drains: every row has ended
        assert_pages_back(engine)
        assert adapter.kv.pages.stats.allocated > adapter.kv.pages.num_pages, "pages were used again"
    finally:
        engine.close()


@pytest.mark.parametrize("model", PAGED)
def test_one_packed_forward_carries_decode_rows_and_a_joining_prompt(pair, model):
    """Decoding rows and a joining row's whole prompt (its image too) in one forward, each
    row with its own positions: every token is the one the row gets alone."""
    _, engine = pair[model]
    adapter, pages = engine.adapter, engine.adapter.kv.pages

    def begin(i: int):
        seq = adapter.start(prepare(engine, i, 8), [])
        assert pages.grow(seq.key, seq.length + 8)
        return seq

    def alone(i: int, steps: int) -> list[int]:
        seq = begin(i)
        out = adapter.prefill([(seq, 0, seq.length)])
        out += [adapter.decode([seq])[0] for _ in range(steps - 1)]
        adapter.free(seq)
        return out

    expected = {0: alone(0, 8), 1: alone(1, 6), 2: alone(2, 4)}
    first, second, third = begin(0), begin(1), begin(2)
    got = {0: adapter.prefill([(first, 0, first.length)]), 1: [], 2: []}
    got[0] += adapter.decode([first])
    decoded, prefilled = adapter.step([first], [(second, 0, second.length)])
    got[0] += decoded
    got[1] += prefilled
    half = adapter.chunk_end(third, 0, third.length // 2)  # two chunks: its image split between them
    assert half < third.length
    for chunk in ((third, 0, half), (third, half, third.length)):
        decoded, prefilled = adapter.step([first, second], [chunk])
        got[0].append(decoded[0])
        got[1].append(decoded[1])
        got[2] += [token for token in prefilled if token is not None]
    for _ in range(3):
        decoded, _ = adapter.step([first, second, third], [])
        for key, token in zip((0, 1, 2), decoded, strict=True):
            got[key].append(token)
    for seq in (first, second, third):
        adapter.free(seq)
    assert got == expected


def test_the_cpu_kernel_reads_pages_in_place_and_answers_as_the_gather_does(tiny_models_dir):
    """The CPU decode kernel (built once per machine) is the default here, and every token it
    gives equals the gather-and-SDPA path's, rows joining and leaving."""
    from vlm_engine.kv import cpu_attention

    assert cpu_attention.available(), "the C++ kernel could not be built: is a compiler (g++) installed?"
    engines = {
        name: make_engine(tiny_models_dir, "qwen3-vl", WARMUP="false", PAGED_ATTENTION=name, PREFIX_CACHING="false")
        for name in ("auto", "gather")
    }
    try:
        assert engines["auto"].adapter.read_in_place and not engines["gather"].adapter.read_in_place
        answers = {}
        for name, engine in engines.items():
            requests = []
            for i in range(4):
                requests.append(Request(engine, prepare(engine, i, 12 + 6 * i)))
                requests[-1].first_text()
            answers[name] = [r.result().text for r in requests]
        assert answers["auto"] == answers["gather"]
        counters = engines["auto"].adapter.kv.counters
        assert counters.attended_tokens < engines["gather"].adapter.kv.counters.attended_tokens
    finally:
        for engine in engines.values():
            engine.close()


def test_a_failed_step_leaves_each_rows_token_record_as_it_was(pair, monkeypatch):
    """A step that fails (out of memory) is tried again: the tokens a row has fed, which name
    its pages in the prefix cache, must not count the failed try."""
    import torch

    _, engine = pair["llava"]
    adapter = engine.adapter
    seq = adapter.start(prepare(engine, 0, 8), [])
    assert adapter.kv.pages.grow(seq.key, seq.length + 8)
    adapter.prefill([(seq, 0, seq.length)])
    forward = adapter.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(adapter, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        adapter.decode([seq])
    monkeypatch.setattr(adapter, "forward", forward)
    adapter.decode([seq])
    assert len(seq.ids) == seq.cached == seq.length + 1
    adapter.free(seq)


def greedy_tokens(engine, requests: list[list[Message]], count: int = 8) -> list[list[int]]:
    """Each request's first ``count`` tokens, all prefilled in one step and decoded together."""
    adapter = engine.adapter
    seqs = [adapter.start(engine.prepare(messages, count, 0.0), []) for messages in requests]
    try:
        for seq in seqs:
            assert adapter.kv.pages.grow(seq.key, seq.length + count)
        got = [[token] for token in adapter.prefill([(seq, 0, seq.length) for seq in seqs])]
        for _ in range(count - 1):
            for row, token in zip(got, adapter.decode(seqs), strict=True):
                row.append(token)
        return got
    finally:
        for seq in seqs:
            adapter.free(seq)


@pytest.mark.parametrize("model", PAGED)
def test_a_steps_images_go_through_the_vision_encoder_in_one_batch(pair, model):
    """Three prompts prefilled in one step, two of them about the same image: the encoder runs
    once, over the two distinct images, and each row's tokens are those it gets alone."""
    _, engine = pair[model]  # no prefix cache: only the encoder cache could spare work
    adapter = engine.adapter
    requests = [
        [Message("user", QUESTION, [IMAGE])],
        [Message("user", "Say what is left.", [OTHER])],
        [Message("user", "Name one colour.", [IMAGE])],
    ]
    alone = []
    for messages in requests:
        adapter.runner.encoder_cache.clear()
        alone += greedy_tokens(engine, [messages])
    adapter.runner.encoder_cache.clear()
    batches, encode = [], adapter.encode_images

    def counted(pixels):
        batches.append(len(pixels))
        return encode(pixels)

    adapter.encode_images = counted
    try:
        together = greedy_tokens(engine, requests)
    finally:
        adapter.encode_images = encode
    assert batches == [2], "one batch of the two distinct images"
    assert together == alone
