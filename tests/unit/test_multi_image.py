"""Several images per request (issue 18): Qwen3-VL and LLaVA take images in one message and
in several turns, up to MAX_IMAGES counting every turn; each image changes the answer, and a
row with several images gets its solo answer in a batch."""

from __future__ import annotations

import pytest

from tests.conftest import image_bytes
from tests.unit.test_scheduler import make_engine
from vlm_engine.chat import Message

RED = image_bytes((64, 64), "PNG", (200, 10, 10))
GREEN = image_bytes((96, 64), "PNG", (10, 200, 10))
BLUE = image_bytes((64, 96), "JPEG", (10, 10, 200))


def one_message(*images):
    return [Message("user", "Compare these images.", list(images))]


def two_turns(first, second):
    return [
        Message("user", "What is this?", [first]),
        Message("assistant", "A thing."),
        Message("user", "And this?", [second]),
    ]


@pytest.mark.parametrize("model", ["qwen3-vl", "llava"])
def test_images_in_one_message_and_in_two_turns(tiny_models_dir, model):
    engine = make_engine(tiny_models_dir, model)
    try:
        conversations = [
            one_message(RED, GREEN),
            one_message(RED, BLUE),
            one_message(GREEN, RED),  # the order is the prompt's
            two_turns(RED, GREEN),
            two_turns(RED, BLUE),
            one_message(RED),
        ]
        alone = [engine.generate([engine.prepare(c, 12, 0.0)])[0].text for c in conversations]
        assert len(set(alone)) == len(alone), alone  # every image is seen, in its place
        together = engine.generate([engine.prepare(c, 12, 0.0) for c in conversations])
        assert [r.text for r in together] == alone
        prepared = engine.prepare(one_message(RED, GREEN, BLUE), 4, 0.0)
        image_rows = (
            prepared.inputs["pixel_values"].shape[0] if model == "llava" else len(prepared.inputs["image_grid_thw"])
        )
        assert image_rows == 3
    finally:
        engine.close()
