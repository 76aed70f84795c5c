"""The compiled step (``COMPILE_STEP=all``, torch.compile with inductor's C++ backend on CPU,
float32: decode steps, and for LLaVA and Qwen3-VL steps carrying prompt chunks too) gives
every token the eager step gives: rows joining and leaving at every
step, a prompt that starts on cached pages (prefix hit), rows preempted for lack of pages and
prefilled again. Moondream2 runs its own API, not the runner: it has no compiled step.

Each architecture's compiled engine is compared with an eager one on the same checkpoint.
"""

from __future__ import annotations

import pytest

from tests.conftest import image_bytes
from tests.unit.test_prefix_cache import QUESTION, turns
from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.chat import single_turn
from vlm_engine.tiny.samples import PROMPTS

PAGED = ["llava", "kosmos2", "qwen3-vl"]


@pytest.fixture(scope="module", params=PAGED)
def pair(request, tiny_models_dir):
    """Per architecture: an engine with the compiled step, and one without (the reference)."""
    engines = [
        make_engine(tiny_models_dir, request.param, COMPILE_STEP=compiled, IGNORE_EOS="true")
        for compiled in ("all", "false")
    ]
    assert engines[0].adapter.runner.compiled is not None and engines[1].adapter.runner.compiled is None
    yield engines
    for engine in engines:
        engine.close()


def answers(engine, requests: list) -> list[str]:
    """Every request submitted at once (each answer a different length: rows leave at
    different steps while the others go on), the texts in order."""
    submitted = [Request(engine, make(engine)) for make in requests]
    return [r.result().text for r in submitted]


def test_rows_joining_and_leaving_answer_as_the_eager_step_does(pair):
    compiled, eager = pair
    requests = [lambda e, i=i: prepare(e, i, 6 + 5 * i) for i in range(6)]
    runner = compiled.adapter.runner
    before, chunk_steps = runner.compiled_steps, runner.compiled_chunk_steps
    assert answers(compiled, requests) == answers(eager, requests)
    assert runner.compiled_steps > before, "the compiled step ran"
    if runner.compiled_chunks is not None:  # LLaVA, Qwen3-VL: prompt chunks from embeddings
        assert runner.compiled_chunk_steps > chunk_steps, "steps carrying prompt chunks ran compiled"
    other_images = [
        lambda e, i=i: e.prepare(single_turn(PROMPTS[i], image_bytes((64, 64), "PNG", (9, 9, 9 * i))), 6 + 5 * i, 0.0)
        for i in range(6)
    ]
    assert answers(eager, other_images) != answers(eager, requests), "the images matter to these answers"
    assert answers(compiled, other_images) == answers(eager, other_images)


def test_a_prefix_hit_answers_as_the_eager_step_does(pair):
    compiled, eager = pair
    first = answers(eager, [lambda e: e.prepare(turns(QUESTION), 12, 0.0)])[0]
    chat = turns(QUESTION, first, "And what colour is it?")
    answers(compiled, [lambda e: e.prepare(turns(QUESTION), 12, 0.0)])  # the first turn, into its cache
    pages, runner = compiled.adapter.kv.pages, compiled.adapter.runner
    hits, steps = pages.stats.hit_tokens, runner.compiled_steps
    got = answers(compiled, [lambda e: e.prepare(chat, 12, 0.0)])
    assert pages.stats.hit_tokens > hits, "the next turn started on cached pages"
    assert runner.compiled_steps > steps, "it decoded compiled"
    assert got == answers(eager, [lambda e: e.prepare(chat, 12, 0.0)])


def test_preempted_rows_answer_as_the_eager_step_does(tiny_models_dir):
    """A pool too small for every row at once: rows are preempted and prefilled again."""
    small_pool = {"KV_CACHE_TOKENS": "160", "PREFIX_CACHING": "false", "IGNORE_EOS": "true"}
    engines = [make_engine(tiny_models_dir, "qwen3-vl", COMPILE_STEP=c, **small_pool) for c in ("true", "false")]
    try:
        requests = [lambda e, i=i: prepare(e, i, 40) for i in range(4)]
        assert answers(engines[0], requests) == answers(engines[1], requests)
        assert engines[0].scheduler.stats.preempted > 0, "the pool was too small: rows were preempted"
        assert engines[0].adapter.runner.compiled_steps > 0
    finally:
        for engine in engines:
            engine.close()


def test_serving_compiles_nothing_after_warm_up(pair):
    """Warm-up builds every graph (decode: one row, several; prompt chunks: with and without
    image tokens, one prompt finishing or several): requests of every shape then compile
    nothing while serving, where a compile stalls every row for seconds."""
    from torch._dynamo.utils import counters

    compiled, _ = pair
    graphs = counters["stats"]["unique_graphs"]
    answers(compiled, [lambda e, i=i: prepare(e, i, 3 + 4 * i) for i in range(5)])  # images, one batch
    answers(compiled, [lambda e, w=w: e.prepare(single_turn(f"Say {w}.", None), 4, 0.0) for w in "xyz"])
    first = answers(compiled, [lambda e: e.prepare(turns(QUESTION), 6, 0.0)])[0]
    answers(compiled, [lambda e: e.prepare(turns(QUESTION, first, "And its colour?"), 6, 0.0)])  # prefix hit
    assert counters["stats"]["unique_graphs"] == graphs


def test_two_models_of_one_class_and_other_sizes_keep_their_own_graphs(pair):
    """Graphs are kept per code object and the runner skips guards on modules: compiled as the
    model class's ``forward``, a graph traced for one engine's model was taken for another of the
    same class (gpu-check's shrunk configs after the tiny checkpoints: a wrong shape at run
    time). Each runner's model gets a ``forward`` with a code object of its own (``own_code``)."""
    import torch

    from vlm_engine.runner import own_code

    compiled, _ = pair
    model = compiled.adapter.forward_module()
    assert type(model).forward.__code__ is not type(model).__mro__[1].forward.__code__
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}

    class Head(torch.nn.Module):  # a model class of its own, as the engine's are (not one of torch.nn's)
        def __init__(self, width: int):
            super().__init__()
            self.out = torch.nn.Linear(8, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(x).relu()

    x = torch.randn(3, 8)
    for width in (5, 7):  # one class, two sizes, in turn (the second failed without own_code)
        head = Head(width)
        step = torch.compile(own_code(head), dynamic=True, options=options)
        assert torch.allclose(step(x), head(x), atol=1e-6)
