"""What a step carries besides its decode rows: the chunk budget's online fit (``Pace``) and
new prompts waiting for others to go with them (``PREFILL_GATHER_STEPS``)."""

from __future__ import annotations

import pytest

from tests.unit.test_scheduler import NEVER_ENDING, Request, endless, make_engine, prepare
from vlm_engine.scheduler import MIN_CHUNK, Pace

DECODE_S = 0.004
FIXED_S = 0.005  # what carrying any prompt tokens adds to a step
TOKEN_S = 0.00001  # ... and each of them


def fed(sizes: list[int]) -> Pace:
    """A pace that saw decode steps, then steps carrying ``sizes`` prompt tokens beside them,
    each taking the decode step plus the fixed part plus the tokens' part."""
    pace = Pace()
    for _ in range(4):
        pace.record(DECODE_S, 16, 0)
    for tokens in sizes:
        pace.record(DECODE_S + FIXED_S + TOKEN_S * tokens, 16, tokens)
    return pace


def test_the_fixed_part_of_a_step_with_prompts_is_not_counted_per_token():
    pace = fed([20, 100, 30, 200, 50] * 4)
    assert pace.fixed_s == pytest.approx(FIXED_S, rel=1e-3)
    assert pace.token_s == pytest.approx(TOKEN_S, rel=1e-3)
    spare = 3 * DECODE_S  # a step with prompts may take four decode steps
    assert pace.budget(spare) == pytest.approx((spare - FIXED_S) / TOKEN_S, abs=1)
    # counted per token, steps of 20-200 tokens would have allowed only ~100 tokens
    per_token = sum(FIXED_S / t + TOKEN_S for t in (20, 100, 30, 200, 50)) / 5
    assert pace.budget(spare) > 5 * spare / per_token


def test_a_step_that_pays_the_fixed_part_carries_at_least_as_many_tokens_as_it_is_worth():
    pace = fed([20, 100, 30, 200, 50] * 4)
    assert pace.budget(0.0) == pytest.approx(FIXED_S / TOKEN_S, abs=1)  # no spare time: still worth its fixed cost


def test_one_size_of_step_falls_back_to_a_cost_per_token():
    pace = fed([64] * 6)
    assert pace.fixed_s == 0.0
    assert pace.token_s == pytest.approx((FIXED_S + 64 * TOKEN_S) / 64)
    assert pace.budget(0.0) == MIN_CHUNK


@pytest.fixture(scope="module")
def gathering(tiny_models_dir):
    """LLaVA engines whose new prompts wait 3 steps, and 0, for others; the chunk budget is
    PREFILL_BUDGET alone (no timing), so a prompt's wait is a count of steps, not of seconds."""
    engines = {
        steps: make_engine(
            tiny_models_dir, "llava", PREFILL_GATHER_STEPS=str(steps), PREFILL_STEP_MULTIPLE="0", **NEVER_ENDING
        )
        for steps in (3, 0)
    }
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.mark.parametrize("steps", [3, 0])
def test_a_new_prompt_with_a_new_image_waits_gather_steps_while_rows_decode(gathering, steps):
    engine, other = gathering[steps], gathering[3 - steps]
    expected = other.generate([prepare(other, 3, 5)])[0].text  # the same weights: the same answer
    long, gone = endless(engine, 0)
    long.first_text()
    before = engine.scheduler.stats.gathered
    assert Request(engine, prepare(engine, 3, 5)).result().text == expected
    assert engine.scheduler.stats.gathered - before == steps
    gone.set()
    assert long.result().finish_reason == "cancelled"


def test_a_prompt_whose_image_is_encoded_already_does_not_wait(gathering):
    """Its step would not call the vision encoder: there is no fixed part to share."""
    engine = gathering[3]
    long, gone = endless(engine, 0)
    long.first_text()
    stats = engine.scheduler.stats
    before = stats.gathered
    first = Request(engine, prepare(engine, 4, 5)).result().text
    assert stats.gathered - before == 3, "a new image: it waited"
    before = stats.gathered
    assert Request(engine, prepare(engine, 4, 5)).result().text == first
    assert stats.gathered == before, "its image cached (its pages, its encoding): it went at once"
    gone.set()
    assert long.result().finish_reason == "cancelled"


def test_a_new_prompt_on_an_idle_engine_does_not_wait(gathering):
    engine = gathering[3]
    before = engine.scheduler.stats.gathered
    engine.generate([prepare(engine, 2, 4)])
    assert engine.scheduler.stats.gathered == before
