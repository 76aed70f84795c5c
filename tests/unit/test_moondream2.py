"""moondream2: the stand-in keeps the real code's traps, and the adapter copes with each.

The stand-in (``vlm_engine/tiny/moondream_standin.py``) behaves like the real remote code
under transformers 5 where the engine depends on it; the first tests prove that it does
(each trap fails without the adapter), the rest check the adapter through the engine.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import image_bytes
from vlm_engine.adapters.moondream2 import TOKENIZER_REPO, restore_tables, tokenizer_from, with_post_init
from vlm_engine.chat import Message, single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import InvalidRequest, ModelConfigError, PromptTooLong
from vlm_engine.settings import resolve_settings
from vlm_engine.tiny.samples import PROMPTS

SIZES = [(64, 64), (224, 224), (300, 120), (97, 211), (500, 400), (32, 48), (160, 160), (640, 360)]


def make_engine(models_dir: Path, **env: str) -> VLMEngine:
    return VLMEngine(resolve_settings("moondream2", env={"VLM_MODELS_DIR": str(models_dir), **env}))


@pytest.fixture(scope="module")
def engine(tiny_models_dir):
    loaded = make_engine(tiny_models_dir)
    yield loaded
    loaded.close()


def image(i: int) -> bytes:
    return image_bytes(SIZES[i], "PNG" if i % 2 else "JPEG", (30 * i, 90, 200 - 20 * i))


def ask(engine: VLMEngine, prompt: str, picture: bytes | None, max_tokens: int = 12, **kwargs):
    return engine.prepare(single_turn(prompt, picture), max_tokens, 0.0, **kwargs)


# -- the stand-in reproduces the real code's behaviour


def _remote_class(folder: Path):
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    return config, get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], folder)


def test_the_stand_in_fails_to_load_like_the_real_code(tiny_models_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    folder = tiny_models_dir / "moondream2"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, offline
    with pytest.raises(OSError, match="cannot find the requested files in the local cache"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # the starmie-v1 download
    config, remote = _remote_class(folder)
    with tokenizer_from(remote, folder / TOKENIZER_REPO / "tokenizer.json"):
        with pytest.raises(AttributeError, match="all_tied_weights_keys"):  # no post_init()
            remote.from_pretrained(folder, config=config)
        model = with_post_init(remote).from_pretrained(folder, config=config, dtype=torch.float32)
        fresh = type(model.model)(model.model.config, setup_caches=False)
    assert model.dtype == torch.bfloat16, "its weights are bfloat16 whatever is asked"
    assert not torch.equal(model.model.attn_mask, fresh.attn_mask), "tables come back uninitialised"
    restore_tables(model.model)
    assert torch.equal(model.model.attn_mask, fresh.attn_mask)
    assert torch.allclose(model.model.text.freqs_cis, fresh.text.freqs_cis, atol=1e-5)
    assert not hasattr(model, "tokenizer") and type(model.model.tokenizer).__name__ == "Tokenizer"
    model.to(torch.float32)
    with pytest.raises(RuntimeError, match="dtype"):  # its image crops stay bfloat16
        model.encode_image(Image.new("RGB", (40, 40)), {"variant": None})


@pytest.fixture(scope="module")
def remote_model(engine):
    return engine.adapter.model  # the stand-in, loaded by the adapter


def test_the_stand_in_keeps_one_cache_streams_per_word_and_needs_variant(remote_model, engine):
    red, blue = Image.new("RGB", (80, 80), (220, 20, 20)), Image.open(io.BytesIO(image(4)))
    settings = {"variant": None, "max_tokens": 24, "temperature": 0}
    with pytest.raises(KeyError, match="variant"):
        remote_model.query(red, "what is it?", settings={"max_tokens": 4})
    engine.adapter._bind(engine.adapter._new_caches())
    alone = list(remote_model.query(red, "what is it?", stream=True, settings=settings)["answer"])
    assert all(chunk.endswith((" ", "\n")) for chunk in alone[:-1]), "chunks are words, not tokens"
    first = remote_model.query(red, "what is it?", stream=True, settings=settings)["answer"]
    mixed = [next(first)]
    remote_model.query(blue, "and this?", stream=True, settings=settings)  # writes its image into the one cache
    mixed += list(first)
    assert "".join(mixed) != "".join(alone), "two requests through one cache corrupt each other"
    with pytest.raises(ValueError, match="caption length"):
        remote_model.caption(red, length="huge")
    with pytest.raises(ValueError, match="PIL Image"):
        remote_model.caption(None)


def test_the_stand_in_hits_the_context_wall_mid_stream(remote_model, engine):
    engine.adapter._bind(engine.adapter._new_caches())
    red = Image.new("RGB", (80, 80), (220, 20, 20))
    stream = remote_model.query(red, "go on", stream=True, settings={"variant": None, "max_tokens": 10_000})["answer"]
    with pytest.raises(IndexError):
        list(stream)


# -- the adapter


def test_the_adapter_loads_the_tables_the_tokenizer_and_the_dtype(engine, tiny_models_dir):
    inner = engine.adapter.model.model
    _config, remote = _remote_class(tiny_models_dir / "moondream2")
    with tokenizer_from(remote, tiny_models_dir / "moondream2" / TOKENIZER_REPO / "tokenizer.json"):
        fresh = type(inner)(inner.config, setup_caches=False)
    assert torch.equal(inner.attn_mask, fresh.attn_mask)
    assert torch.allclose(inner.text.freqs_cis, fresh.text.freqs_cis, atol=1e-5)
    assert engine.adapter.model.dtype == torch.float32  # DTYPE=auto on CPU
    assert engine.adapter.tokenizer is inner.tokenizer
    assert engine.settings.max_tokens_cap <= inner.config.text.max_context - engine.adapter.image_tokens
    bf16 = make_engine(tiny_models_dir, DTYPE="bfloat16", WARMUP="false")
    try:
        assert bf16.adapter.model.dtype == torch.bfloat16
        assert bf16.generate([ask(bf16, "What is this?", image(0), 4)])[0].output_tokens == 4
    finally:
        bf16.close()


def test_a_missing_tokenizer_is_a_load_error_that_says_what_to_do(tiny_models_dir, tmp_path):
    folder = tmp_path / "moondream2"
    shutil.copytree(tiny_models_dir / "moondream2", folder, ignore=shutil.ignore_patterns("moondream"))
    with pytest.raises(ModelConfigError, match=r"make models MODELS=moondream2"):
        VLMEngine(resolve_settings("moondream2", env={"VLM_MODELS_DIR": str(tmp_path), "HF_CACHE_DIR": str(tmp_path)}))


def test_the_tokenizer_is_read_from_the_cache_at_the_pinned_revision(tiny_models_dir, tmp_path):
    """What ``make models`` leaves: ``models--moondream--starmie-v1/snapshots/<pinned>/``."""
    from vlm_engine.adapters.moondream2 import TOKENIZER_REVISION

    folder = tmp_path / "models" / "moondream2"
    shutil.copytree(tiny_models_dir / "moondream2", folder, ignore=shutil.ignore_patterns("moondream"))
    snapshot = tmp_path / "cache" / "models--moondream--starmie-v1" / "snapshots" / TOKENIZER_REVISION
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_models_dir / "moondream2" / TOKENIZER_REPO / "tokenizer.json", snapshot)
    env = {"VLM_MODELS_DIR": str(tmp_path / "models"), "HF_CACHE_DIR": str(tmp_path / "cache"), "WARMUP": "false"}
    loaded = VLMEngine(resolve_settings("moondream2", env=env))
    try:
        assert loaded.generate([ask(loaded, "What is this?", image(1), 3)])[0].output_tokens == 3
    finally:
        loaded.close()


def test_eight_concurrent_requests_with_different_images_get_their_solo_answers(engine):
    alone = [engine.generate([ask(engine, PROMPTS[i], image(i), 8 + 3 * i)])[0] for i in range(8)]
    text_only = engine.generate([ask(engine, "Say something.", None, 10)])[0]
    assert len({r.text for r in alone}) == 8
    together = engine.generate([ask(engine, PROMPTS[i], image(i), 8 + 3 * i) for i in range(8)])
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.output_tokens for r in together] == [r.output_tokens for r in alone]
    # a text-only query replaces the model's caches: its neighbours must not notice
    mixed = engine.generate([ask(engine, PROMPTS[0], image(0), 8), ask(engine, "Say something.", None, 10)])
    assert [r.text for r in mixed] == [alone[0].text, text_only.text]


@pytest.mark.parametrize("max_tokens", [1, 5, 20])
def test_token_counts_and_finish_reasons_are_exact(engine, max_tokens):
    before = engine.scheduler.stats.tokens
    result = engine.generate([ask(engine, PROMPTS[1], image(1), max_tokens)])[0]
    assert (result.output_tokens, result.finish_reason) == (max_tokens, "length")
    assert engine.scheduler.stats.tokens - before == max_tokens
    assert len(engine.adapter.tokenizer.encode(result.text).ids) >= 1


@pytest.mark.parametrize("temperature", [1.401298464324817e-45, 1e-300])
def test_a_tiny_temperature_is_sampled_not_a_nan_error(engine, temperature):
    """Found by schemathesis: the code divides its logits by the temperature (inf, then NaN)."""
    greedy = engine.generate([ask(engine, PROMPTS[2], image(2), 6)])[0]
    prepared = engine.prepare(single_turn(PROMPTS[2], image(2)), 6, temperature, 5e-324)
    assert engine.generate([prepared])[0].text == greedy.text


def test_the_context_limit_is_refused_up_front_and_the_last_position_is_usable(engine):
    adapter = engine.adapter
    prepared = ask(engine, PROMPTS[0], image(0), 1)
    room = adapter.context - prepared.inputs.positions
    with pytest.raises(PromptTooLong, match=f"Set max_tokens to at most {room}"):
        ask(engine, PROMPTS[0], image(0), room + 1)
    result = engine.generate([ask(engine, PROMPTS[0], image(0), room)])[0]  # the real code's last position
    assert (result.output_tokens, result.finish_reason) == (room, "length")
    long_question = "why " * (adapter.context - adapter.image_tokens)
    with pytest.raises(PromptTooLong):
        ask(engine, long_question, image(0), 1)


@pytest.mark.parametrize(
    ("prompt", "with_image", "message"),
    [
        ("/caption", False, "needs an image"),
        ("/caption huge", True, "short, normal, long"),
        ("/detect", True, "needs something to look for"),
        ("/point   ", True, "needs something to look for"),
        ("/point cat", False, "needs an image"),
    ],
)
def test_bad_commands_are_refused_in_prepare(engine, prompt, with_image, message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        ask(engine, prompt, image(2) if with_image else None)
    assert caught.value.status == 400


def test_caption_detect_and_point(engine):
    caption, detect, point = engine.generate(
        [
            ask(engine, "/caption short", image(3)),
            ask(engine, "/detect red car", image(3)),
            ask(engine, "/point tree", image(5)),
        ]
    )
    assert caption.text and caption.entities is None
    (boxes,) = detect.entities
    assert boxes["phrase"] == "red car" and 1 <= len(boxes["boxes"]) <= engine.settings.max_objects
    assert all(0 <= v <= 1 for box in boxes["boxes"] for v in box) and all(
        b[0] <= b[2] and b[1] <= b[3] for b in boxes["boxes"]
    )
    assert detect.text == f"red car: {len(boxes['boxes'])} {'box' if len(boxes['boxes']) == 1 else 'boxes'}"
    (points,) = point.entities
    assert points["phrase"] == "tree" and all(len(p) == 2 and 0 <= min(p) <= max(p) <= 1 for p in points["points"])
    assert detect.finish_reason == point.finish_reason == "stop"


def test_grounding_honours_max_objects(tiny_models_dir):
    small = make_engine(tiny_models_dir, MOONDREAM2_MAX_OBJECTS="2", WARMUP="false")
    try:
        (entity,) = small.generate([ask(small, "/detect dog", image(0))])[0].entities
        assert 1 <= len(entity["boxes"]) <= 2
    finally:
        small.close()


def test_an_encoded_image_is_reused_in_the_next_turn(engine, tiny_models_dir):
    picture = image(6)
    first = [Message("user", "What is in the picture?", [picture])]
    answer = engine.generate([engine.prepare(first, 6, 0.0)])[0].text
    history = [Message("user", "What is in the picture?"), Message("assistant", answer)]  # as /api/chat sends it
    second = [*history, Message("user", "And the colors?", [picture])]
    hits = engine.adapter.image_hits
    reused = engine.generate([engine.prepare(second, 6, 0.0)])[0]
    assert engine.adapter.image_hits == hits + 1
    plain = make_engine(tiny_models_dir, MOONDREAM2_ENCODED_IMAGES="0", WARMUP="false")
    try:
        again = [*history, Message("user", "And the colors?", [picture])]
        assert plain.generate([plain.prepare(again, 6, 0.0)])[0].text == reused.text
        assert plain.adapter.image_hits == 0
    finally:
        plain.close()


def test_released_rows_leave_their_buffers_for_the_next_ones(engine):
    engine.generate([ask(engine, PROMPTS[0], image(0), 3)])  # the batch empties: its buffers are kept
    pool = engine.adapter._pool
    assert pool, "the last row's buffers were dropped"
    kept = {keys.data_ptr() for caches in pool for keys, _ in caches}
    before = engine.generate([ask(engine, "Say something.", None, 6)])[0].text  # text-only: no new caches either
    assert {keys.data_ptr() for caches in pool for keys, _ in caches} == kept
    assert engine.generate([ask(engine, "Say something.", None, 6)])[0].text == before  # reused buffers are clean
