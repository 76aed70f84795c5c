"""Request inputs made in worker processes (``PREPARE_WORKERS``, ``vlm_engine.preparing``):
the same inputs and answers as made on the request's thread, the same errors, a dead worker
replaced, no process left after the engine closes."""

from __future__ import annotations

import io
import os
import signal

import pytest
import torch
from PIL import Image

from tests.unit.test_scheduler import make_engine
from vlm_engine.chat import Message, single_turn
from vlm_engine.errors import ImageTooLarge, InvalidImage, PromptTooLong
from vlm_engine.preparing import ImageSize, make_inputs

MODELS = ("llava", "qwen3-vl", "kosmos2")


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    data = io.BytesIO()
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 4):  # some structure, so that the processor's output is not flat
        image.putpixel((x, x % size[1]), (255 - color[0], x % 256, color[2]))
    image.save(data, format="PNG")
    return data.getvalue()


@pytest.fixture(scope="module", params=MODELS)
def engine(request, tiny_models_dir):
    loaded = make_engine(tiny_models_dir, request.param, PREPARE_WORKERS="1", MAX_PROMPT_TOKENS="64")
    yield loaded
    loaded.close()


def conversation(with_image: bool = True) -> list[Message]:
    if not with_image:
        return single_turn("What is in the picture?", None)
    return single_turn("What is in the picture?", png((200, 30, 90)))


@pytest.mark.parametrize("with_image", [True, False])
def test_inputs_from_a_worker_equal_the_threads(engine, with_image):
    assert engine.input_workers is not None and len(engine.input_workers.pids()) == 1
    from_worker = engine.prepare(conversation(with_image), 6, 0.0)
    here = make_inputs(engine.adapter, conversation(with_image), from_worker.params, None)
    assert set(from_worker.inputs) == set(here.inputs)
    for name, value in here.inputs.items():
        assert from_worker.inputs[name].dtype == value.dtype, name
        assert torch.equal(from_worker.inputs[name], value), name
    assert from_worker.prompt_tokens == here.prompt_tokens
    assert from_worker.image_keys == here.image_keys and len(from_worker.image_keys) == len(here.decoded[0])
    sizes = [ImageSize(*image.size) for image in here.decoded[0]]
    assert from_worker.messages[0].decoded == sizes


def test_answers_equal_the_threads(engine, tiny_models_dir):
    """Greedy tokens of requests prepared in the worker equal those prepared here (two
    different images, so that a wrong image's pixels would show)."""
    images = [png((200, 30, 90)), png((10, 220, 40), (40, 72))]
    workers = engine.input_workers
    answers = {}
    for where in ("worker", "thread"):
        engine.input_workers = workers if where == "worker" else None
        try:
            prepared = [engine.prepare(single_turn("Describe it.", image), 6, 0.0) for image in images]
        finally:
            engine.input_workers = workers
        answers[where] = [r.text for r in engine.generate(prepared)]
    assert answers["worker"] == answers["thread"]


def test_errors_come_back_as_the_engines(engine):
    with pytest.raises(InvalidImage, match="not a recognised image"):
        engine.prepare(single_turn("What is it?", b"not an image at all"), 4, 0.0)
    with pytest.raises(PromptTooLong, match="MAX_PROMPT_TOKENS"):
        engine.prepare(single_turn("word " * 200, png((1, 2, 3))), 4, 0.0)
    assert engine.prepare(conversation(), 4, 0.0).inputs["input_ids"].shape[-1] > 0  # still serving


def test_a_killed_worker_is_replaced(engine):
    before = engine.input_workers.pids()
    os.kill(before[0], signal.SIGKILL)
    prepared = engine.prepare(conversation(), 4, 0.0)  # retried on a new worker
    after = engine.input_workers.pids()
    assert after != before and len(after) == 1
    assert engine.generate([prepared])[0].output_tokens > 0


def test_closing_the_engine_ends_its_workers(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", PREPARE_WORKERS="2", WARMUP="false")
    workers = engine.input_workers
    processes = [worker.process for worker in workers._workers]
    assert len(processes) == 2 and all(p.poll() is None for p in processes)
    engine.close()
    assert all(p.poll() is not None for p in processes)
    assert engine.input_workers is None


def test_image_limits_hold_in_the_worker(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", PREPARE_WORKERS="1", WARMUP="false", MAX_IMAGE_PIXELS="1000")
    try:
        with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS"):
            engine.prepare(single_turn("What is it?", png((1, 2, 3), (64, 48))), 4, 0.0)
    finally:
        engine.close()


def test_a_worker_that_cannot_start_fails_the_load_with_what_to_do(tiny_models_dir, monkeypatch):
    """A worker that exits before loading (here: an interpreter that is not Python) fails the
    engine's load with a configuration error that names the way out, not a hang."""
    from vlm_engine import preparing
    from vlm_engine.errors import ModelConfigError

    monkeypatch.setattr(preparing, "python_executable", lambda: "/bin/false")
    with pytest.raises(ModelConfigError, match="PREPARE_WORKERS=0"):
        make_engine(tiny_models_dir, "llava", PREPARE_WORKERS="1", WARMUP="false")


def test_a_worker_silent_past_its_timeout_is_killed_and_the_request_retried(tiny_models_dir):
    """A stopped worker never answers: after its timeout it is killed and the request is made
    on a new one (whose timeout is the default: no verdict here depends on the machine's speed)."""
    engine = make_engine(tiny_models_dir, "llava", PREPARE_WORKERS="1", WARMUP="false")
    try:
        stuck = engine.input_workers.pids()[0]
        engine.input_workers._workers[0].call_timeout_s = 0.5  # stopped: it never answers in any time
        os.kill(stuck, signal.SIGSTOP)
        prepared = engine.prepare(conversation(), 4, 0.0)
        assert engine.input_workers.pids() != [stuck]
        assert prepared.inputs["pixel_values"].shape[0] == 1
    finally:
        engine.close()


def test_closing_refuses_a_request_its_worker_still_holds(tiny_models_dir):
    """Closing waits for a busy worker, then kills it: the request it held is refused as
    shutting down (not a hang, not a new worker started after close)."""
    import threading
    import time

    from vlm_engine.errors import ShuttingDown

    engine = make_engine(tiny_models_dir, "llava", PREPARE_WORKERS="1", WARMUP="false")
    workers = engine.input_workers
    os.kill(workers.pids()[0], signal.SIGSTOP)  # it takes the request and never answers
    outcome: list[BaseException] = []

    def ask() -> None:
        try:
            engine.prepare(conversation(), 4, 0.0)
        except BaseException as exc:
            outcome.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    while workers._idle.qsize():  # until the request holds the worker
        time.sleep(0.01)
    workers.close(wait_s=0.5)
    asker.join()
    assert len(outcome) == 1 and isinstance(outcome[0], ShuttingDown), outcome
    assert all(worker.process.poll() is not None for worker in workers._workers)
    engine.close()
