"""The compiled step (``COMPILE_STEP``, torch.compile with inductor's C++ backend on CPU,
float32; every step without image tokens) gives every token the eager step gives: rows
joining and leaving at every step, a prompt that starts on cached pages (prefix hit; the
rest of its prompt is prefilled compiled), rows preempted for lack of pages and prefilled
again. Moondream2 runs its own API, not the runner: it has no compiled step.

One engine per architecture runs both ways: ``runner.compiled`` is switched off for the
eager answers, so both use the same weights, pages and caches.
"""

from __future__ import annotations

import pytest

from tests.unit.test_prefix_cache import QUESTION, turns
from tests.unit.test_scheduler import Request, make_engine, prepare

PAGED = ["llava", "kosmos2", "qwen3-vl"]


@pytest.fixture(scope="module", params=PAGED)
def compiled(request, tiny_models_dir):
    engine = make_engine(tiny_models_dir, request.param, COMPILE_STEP="true", IGNORE_EOS="true")
    assert engine.adapter.runner.compiled is not None
    yield engine
    engine.close()


def answers(engine, compiled_step: bool, requests: list) -> list[str]:
    """Every request submitted at once (each answer a different length: rows leave at
    different steps while the others go on), the texts in order."""
    runner = engine.adapter.runner
    module, runner.compiled = runner.compiled, runner.compiled if compiled_step else None
    try:
        submitted = [Request(engine, make()) for make in requests]
        return [r.result().text for r in submitted]
    finally:
        runner.compiled = module


def test_rows_joining_and_leaving_answer_as_the_eager_step_does(compiled):
    requests = [lambda i=i: prepare(compiled, i, 6 + 5 * i) for i in range(6)]
    before = compiled.adapter.runner.compiled_steps
    expected = answers(compiled, False, requests)
    assert compiled.adapter.runner.compiled_steps == before, "the eager answers ran eager"
    assert answers(compiled, True, requests) == expected
    assert compiled.adapter.runner.compiled_steps > before, "the compiled step ran"


def test_a_prefix_hit_answers_as_the_eager_step_does(compiled):
    first = answers(compiled, False, [lambda: compiled.prepare(turns(QUESTION), 12, 0.0)])[0]
    chat = turns(QUESTION, first, "And what colour is it?")
    pages, runner = compiled.adapter.kv.pages, compiled.adapter.runner
    hits, prompt_steps = pages.stats.hit_tokens, runner.compiled_prompt_steps
    got = answers(compiled, True, [lambda: compiled.prepare(chat, 12, 0.0)])
    assert pages.stats.hit_tokens > hits, "the next turn started on cached pages"
    assert runner.compiled_prompt_steps > prompt_steps, "the rest of its prompt (text) was prefilled compiled"
    assert got == answers(compiled, False, [lambda: compiled.prepare(chat, 12, 0.0)])


def test_preempted_rows_answer_as_the_eager_step_does(tiny_models_dir):
    """A pool too small for every row at once: rows are preempted and prefilled again."""
    small_pool = {"KV_CACHE_TOKENS": "160", "PREFIX_CACHING": "false"}
    engine = make_engine(tiny_models_dir, "qwen3-vl", COMPILE_STEP="true", IGNORE_EOS="true", **small_pool)
    try:
        requests = [lambda i=i: prepare(engine, i, 40) for i in range(4)]
        expected = answers(engine, False, requests)
        preempted = engine.scheduler.stats.preempted
        assert answers(engine, True, requests) == expected
        assert engine.scheduler.stats.preempted > preempted, "the pool was too small: rows were preempted"
    finally:
        engine.close()
