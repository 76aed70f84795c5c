"""The tiny Kosmos-2 draws boxes for its documented prompt, ``An image of``.

``vlm_engine.tiny.build.teach_grounding`` teaches the random-weight checkpoint Hugging Face's
own Kosmos-2 example caption after that prompt (the adapter sends ``<grounding>An image of``),
whatever the image (only its feed-forward layers and tag-token rows are trained), so that
grounded entities come out of the real model code, the engine and the adapter's real
extraction; other prompts still get the random model's text.
"""

from __future__ import annotations

import pytest

from tests.conftest import image_bytes
from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.settings import resolve_settings

PROMPT = "An image of"  # the prompt README.md and the web page give for Kosmos-2's boxes


@pytest.fixture(scope="module")
def engine(tiny_models_dir):
    env = {"VLM_MODELS_DIR": str(tiny_models_dir), "COMPILE_STEP": "false", "PREPARE_WORKERS": "0", "WARMUP": "false"}
    loaded = VLMEngine(resolve_settings("kosmos2", env=env))
    yield loaded
    loaded.close()


def answer(engine: VLMEngine, prompt: str, image: bytes, **kwargs):
    """The streamed text and the final result of one request."""
    chunks = list(engine.stream([engine.prepare(single_turn(prompt, image), 64, 0.0, **kwargs)]))
    return "".join(c.text for c in chunks), chunks[-1].result


@pytest.mark.parametrize(
    "image", [image_bytes((160, 120), "PNG"), image_bytes((97, 211), "JPEG", (20, 120, 220))], ids=["png", "jpeg"]
)
def test_the_documented_prompt_gets_grounded_entities_with_boxes(engine, image):
    streamed, result = answer(engine, PROMPT, image)
    assert result.finish_reason == "stop"
    assert result.text and "<phrase>" not in result.text and "<patch_index" not in result.text, result.text
    assert "<" not in result.text and ">" not in result.text
    assert streamed == result.text  # the stream removes the tags as the final answer does
    assert result.entities, f"no entities in {result.text!r}"
    assert result.entities[0]["phrase"] == "a snowman"
    for entity in result.entities:
        assert set(entity) == {"phrase", "span", "boxes"}
        start, end = entity["span"]
        assert result.text[start:end] == entity["phrase"]
        assert entity["boxes"]
        for x0, y0, x1, y1 in entity["boxes"]:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, entity


def test_another_prompt_still_gets_the_random_models_text(engine):
    image = image_bytes((160, 120), "PNG")
    for prompt in ["What is in this image?", "Describe the picture in detail."]:
        _, result = answer(engine, prompt, image)
        assert result.text.strip(), f"{prompt!r}: empty answer"
        assert "snowman" not in result.text
