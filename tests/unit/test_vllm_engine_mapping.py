"""How ENGINE=vllm hands a request to vLLM (``vlm_engine.vllm_engine``): the parts that need no
vLLM, checked here in the project's environment; vLLM itself runs in tests/e2e/test_vllm_engine.py."""

from __future__ import annotations

import json

import pytest

from vlm_engine.adapters.base import Prepared
from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import InvalidParameter, ModelConfigError
from vlm_engine.params import resolve_guide, resolve_params
from vlm_engine.settings import resolve_settings
from vlm_engine.vllm_engine import VisibleText, engine_arguments, guide_arguments, sampling_arguments, visible_gpu


def front(name: str, tiny_models_dir, **env: str) -> VLMEngine:
    settings = resolve_settings(name, env={"VLM_MODELS_DIR": str(tiny_models_dir), **env})
    engine = VLMEngine(settings, load=False)
    engine.adapter.load_inputs()
    return engine


def test_every_sampling_parameter_reaches_vllm():
    sampling = {
        "seed": 11,
        "stop": ["x", "yz"],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "repetition_penalty": 1.3,
        "logprobs": True,
        "top_logprobs": 3,
        "logit_bias": {"50": -100, "7": 2.5},
        "top_k": 40,
    }
    settings = resolve_settings("llava")
    prepared = Prepared(single_turn("hi", None), resolve_params(settings, 7, 0.7, 0.9, sampling))
    assert sampling_arguments(prepared, ignore_eos=True) == {
        "max_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 11,
        "stop": ["x", "yz"],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "repetition_penalty": 1.3,
        "logprobs": 3,
        "logit_bias": {7: 2.5, 50: -100.0},  # int ids, as vLLM's SamplingParams keeps them
        "ignore_eos": True,
        "skip_special_tokens": True,
    }
    guided = Prepared(single_turn("hi", None), resolve_params(settings, 5, sampling={"guide": {"regex": "a+"}}))
    assert sampling_arguments(guided, ignore_eos=True)["ignore_eos"] is False  # the grammar ends it
    plain = sampling_arguments(Prepared(single_turn("hi", None), resolve_params(settings, 5)), ignore_eos=False)
    assert (plain["seed"], plain["stop"], plain["logprobs"], plain["ignore_eos"]) == (None, None, None, False)
    assert plain["logit_bias"] is None


def test_vllms_front_refuses_the_logit_bias_the_native_engine_refuses(tiny_models_dir, png):
    """The front has no weights: the vocabulary's size comes from the checkpoint's config, the
    number vLLM checks against (its model config's text ``vocab_size``), with the native message."""
    engine = front("llava", tiny_models_dir)
    size = engine.vocab_size()
    assert size == json.loads((tiny_models_dir / "llava" / "config.json").read_text())["text_config"]["vocab_size"]
    ask = {"max_tokens": 4, "encode": False}
    prepared = engine.prepare(single_turn("hi", png), sampling={"logit_bias": {str(size - 1): 100}}, **ask)
    assert sampling_arguments(prepared, ignore_eos=False)["logit_bias"] == {size - 1: 100.0}
    for bias, says in (
        ({str(size): 1}, f"outside llava's vocabulary: {size} (vocabulary size {size}: ids 0 to {size - 1})"),
        ({"50": 150}, 'logit_bias["50"] must be a number from -100 to 100, got 150'),
        ({"x": 1}, 'logit_bias keys must be token ids, integers from 0 written in decimal (e.g. "50"), got "x"'),
    ):
        with pytest.raises(InvalidParameter) as caught:
            engine.prepare(single_turn("hi", png), sampling={"logit_bias": bias}, **ask)
        assert says in str(caught.value)


@pytest.mark.parametrize(
    ("guide", "expected"),
    [
        ({"json_schema": {"type": "object"}}, {"json": {"type": "object"}}),
        ({"json_object": True}, {"json_object": True}),
        ({"regex": "[a-c]{2}"}, {"regex": "[a-c]{2}"}),
        ({"choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ],
)
def test_each_guide_becomes_vllms_structured_output(guide, expected):
    assert guide_arguments(resolve_guide(guide)) == expected


def test_text_is_sent_as_the_native_engine_sends_it():
    text = VisibleText()
    pieces = [text.push(delta) for delta in ["  ", " Hello", " ", "wor", "ld ", "\n"]]
    assert pieces == ["", "Hello", "", " wor", "ld", ""]
    assert "".join(pieces) == text.answer == "Hello world"


def test_the_engine_arguments_follow_the_settings(tiny_models_dir):
    llava = front("llava", tiny_models_dir, MAX_PROMPT_TOKENS="100", MAX_IMAGE_TOKENS="50", MAX_TOKENS_CAP="20")
    arguments = engine_arguments(llava.settings, llava.adapter, "cpu")
    assert arguments["model"] == str(tiny_models_dir / "llava") and arguments["dtype"] == "float32"
    assert arguments["max_model_len"] == 100 + 4 * 50 + 20  # prompt + MAX_IMAGES images + answer
    assert arguments["max_num_seqs"] == llava.settings.max_running
    assert arguments["limit_mm_per_prompt"] == {"image": 4}
    assert "enforce_eager" not in arguments and "mm_processor_kwargs" not in arguments
    assert arguments["structured_outputs_config"] == {"backend": "guidance", "disable_any_whitespace": True}
    assert arguments["kv_cache_memory_bytes"] == 4096 * 2**20 and "gpu_memory_utilization" not in arguments
    sized = front("llava", tiny_models_dir, KV_CACHE_MB="512")
    assert engine_arguments(sized.settings, sized.adapter, "cpu")["kv_cache_memory_bytes"] == 512 * 2**20
    long = front("llava", tiny_models_dir, MAX_TOKENS_CAP="100000", COMPILE_STEP="false")
    assert engine_arguments(long.settings, long.adapter, "cpu")["max_model_len"] == 4096  # the checkpoint's positions
    assert engine_arguments(long.settings, long.adapter, "cpu")["enforce_eager"] is True
    past = front("llava", tiny_models_dir, MAX_TOKENS_CAP="100000", IGNORE_EOS="true")
    assert engine_arguments(past.settings, past.adapter, "cpu")["max_model_len"] > 100000


def test_qwen3_vl_images_get_the_same_token_cap_in_vllm(tiny_models_dir):
    qwen = front("qwen3-vl", tiny_models_dir, MAX_IMAGE_TOKENS="64")
    size = engine_arguments(qwen.settings, qwen.adapter, "cpu")["mm_processor_kwargs"]["size"]
    patch = qwen.adapter.image_processor.patch_size * qwen.adapter.image_processor.merge_size
    assert size["longest_edge"] == 64 * patch**2


def test_native_quantization_is_refused(tiny_models_dir):
    engine = front("llava", tiny_models_dir)
    settings = engine.settings.model_copy(update={"quantization_type": "int8"})
    with pytest.raises(ModelConfigError, match="QUANTIZATION_TYPE=int8 is the native engine's"):
        engine_arguments(settings, engine.adapter, "cpu")


def test_a_request_is_checked_and_decoded_without_model_inputs(tiny_models_dir, png):
    engine = front("qwen3-vl", tiny_models_dir)
    prepared = engine.prepare(single_turn("What is it?", png), max_tokens=4, encode=False, n=2, sampling={"seed": 3})
    assert prepared.inputs is None and prepared.state is None
    assert [image.size for image in prepared.images] == [(160, 120)]
    assert "<|image_pad|>" in engine.adapter.prompt(prepared)
    assert [s.params.sampling.seed for s in prepared.siblings] == [4]
    assert json.dumps(prepared.prompt_tokens) and prepared.prompt_tokens > 0


def test_an_instance_triton_put_on_a_gpu_shows_vllm_only_that_gpu():
    """vLLM takes no device index (it runs on the first GPU it sees): an instance on ``cuda:<i>``
    (``TRITON_MODEL_CONFIG=gpu``, one per GPU) must show vLLM GPU ``i`` alone, counted among the
    GPUs the process sees, as Triton counts it; else every instance would share the first GPU."""
    assert visible_gpu("cuda:1", {}) == "1"
    assert visible_gpu("cuda:0", {}) == "0"
    assert visible_gpu("cuda:1", {"CUDA_VISIBLE_DEVICES": "4, 6,7"}) == "6"
    assert visible_gpu("cuda:2", {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb,GPU-cc"}) == "GPU-cc"
    assert visible_gpu("cuda", {"CUDA_VISIBLE_DEVICES": "3"}) is None  # no index: as it is
    assert visible_gpu("cpu", {}) is None
    with pytest.raises(ModelConfigError, match="cuda:2 is not one of the GPUs CUDA_VISIBLE_DEVICES=4,6"):
        visible_gpu("cuda:2", {"CUDA_VISIBLE_DEVICES": "4,6"})


def test_the_gpu_is_narrowed_before_anything_asks_cuda(tiny_models_dir, monkeypatch):
    """``CUDA_VISIBLE_DEVICES`` is read once, when the CUDA driver starts in the process: it is
    set before the front engine resolves its device (its first CUDA call), and the engine then
    runs on the one GPU it sees, ``cuda:0``."""
    import os

    from vlm_engine import vllm_engine

    seen = {}

    class Front:  # the native engine as VllmEngine builds it first: what it is given
        def __init__(self, settings, load=True):
            seen.update(device=settings.device, visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
            raise RuntimeError("stop here")

    monkeypatch.setattr(vllm_engine, "VLMEngine", Front)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    settings = resolve_settings("llava", env={"VLM_MODELS_DIR": str(tiny_models_dir), "DEVICE": "cuda:1"})
    with pytest.raises(RuntimeError, match="stop here"):
        vllm_engine.VllmEngine(settings)
    assert seen == {"device": "cuda:0", "visible": "5"}
