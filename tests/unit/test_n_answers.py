"""n answers to one prompt (issue 18): the prompt is prefilled once, its full KV pages shared
by the other answers (by reference, nothing copied); answer i is what the same request alone
with seed + i gives."""

from __future__ import annotations

import queue

import pytest

from tests.conftest import image_bytes
from tests.unit.test_scheduler import make_engine
from vlm_engine.chat import single_turn
from vlm_engine.errors import InvalidParameter

IMAGE = image_bytes((96, 80), "PNG", (20, 160, 90))


def collect(engine, prepared, n):
    events: queue.Queue = queue.Queue()
    engine.submit(prepared, events.put)
    finals, streamed = {}, dict.fromkeys(range(n), "")
    while len(finals) < n:
        event = events.get(timeout=60)
        assert event.error is None, event.error
        streamed[event.index] += event.text
        if event.final:
            finals[event.index] = event.result
    assert [streamed[i] for i in range(n)] == [finals[i].text for i in range(n)]
    return [finals[i] for i in range(n)]


@pytest.mark.parametrize("model", ["llava", "qwen3-vl", "kosmos2"])
def test_n_answers_share_one_prefill_and_equal_their_solo_answers(tiny_models_dir, model):
    engine = make_engine(tiny_models_dir, model, MAX_N="3", PREFIX_CACHING="false")
    hot = 2.0 if model == "kosmos2" else 1.0  # the tiny Kosmos-2 repeats itself below 2
    try:
        solo = [
            engine.generate([engine.prepare(single_turn("Describe it.", IMAGE), 12, hot, sampling={"seed": 40 + i})])[0]
            for i in range(3)
        ]
        prompt = engine.adapter.prefill_cost(engine.prepare(single_turn("Describe it.", IMAGE), 12))
        kv = engine.adapter.kv
        before, written, copied = engine.scheduler.stats.prefill_tokens, kv.counters.written, kv.counters.copied
        prepared = engine.prepare(single_turn("Describe it.", IMAGE), 12, hot, sampling={"seed": 40}, n=3)
        answers = collect(engine, prepared, 3)
        assert [a.text for a in answers] == [s.text for s in solo]
        assert len({a.text for a in answers}) == 3
        assert engine.scheduler.stats.prefill_tokens - before == prompt + 2  # the others prefill one token each
        per_token = kv.shape.bytes_per_token
        assert kv.counters.written - written == (prompt + 2 + 3 * 11) * per_token
        # the full pages are shared; only the partial page after them is copied, once per sibling
        partial = (prompt - 1) % kv.page_size != 0
        assert kv.counters.copied - copied == 2 * partial * kv.page_size * per_token
        assert kv.pages.used_pages == 0, "every reference came back"
        greedy = collect(engine, engine.prepare(single_turn("Describe it.", IMAGE), 12, 0.0, n=2), 2)
        assert greedy[0].text == greedy[1].text
        with pytest.raises(InvalidParameter, match=r"n must be an integer from 1 to 3 \(MAX_N\)"):
            engine.prepare(single_turn("Describe it.", IMAGE), 12, n=4)
    finally:
        engine.close()


def test_moondream2_takes_one_answer(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "moondream2")
    try:
        with pytest.raises(InvalidParameter, match="moondream2 does not support n"):
            engine.prepare(single_turn("Describe it.", IMAGE), 8, n=2)
    finally:
        engine.close()
