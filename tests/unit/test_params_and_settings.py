import pytest

from vlm_engine.errors import InvalidParameter, MaxTokensTooLarge, ModelConfigError
from vlm_engine.params import resolve_params
from vlm_engine.settings import MODELS, resolve_settings


def test_defaults_are_the_real_checkpoints():
    expected = {
        "moondream2": ("vikhyatk/moondream2", "2025-06-21"),
        "kosmos2": ("microsoft/kosmos-2-patch14-224", None),
        "llava": ("llava-hf/llava-1.5-7b-hf", None),
        "qwen3-vl": ("Qwen/Qwen3-VL-8B-Instruct", None),
    }
    for name, (path, revision) in expected.items():
        settings = resolve_settings(name, env={})
        assert (settings.model_path, settings.model_revision) == (path, revision)
        assert (settings.device, settings.dtype, settings.quantization_type, settings.attention_impl) == (
            "auto",
            "auto",
            "none",
            "sdpa",
        )


def test_precedence_default_then_triton_parameter_then_shared_env_then_model_env():
    params = {"max_new_tokens": "64", "model_path": "/weights/llava"}
    assert resolve_settings("llava", params, env={}).max_new_tokens == 64
    assert resolve_settings("llava", params, env={"MAX_NEW_TOKENS": "32"}).max_new_tokens == 32
    env = {"MAX_NEW_TOKENS": "32", "LLAVA_MAX_NEW_TOKENS": "16", "QWEN3_VL_TEMPERATURE": "0.7"}
    assert resolve_settings("llava", params, env=env).max_new_tokens == 16
    assert resolve_settings("qwen3-vl", env=env).temperature == 0.7
    assert resolve_settings("llava", params, env=env).model_path == "/weights/llava"


def test_weights_source_is_only_read_model_specifically(tmp_path):
    env = {"MODEL_PATH": "/elsewhere", "LLAVA_MODEL_PATH": "org/custom-llava", "LLAVA_MODEL_REVISION": "abc"}
    settings = resolve_settings("llava", env=env)
    assert (settings.model_path, settings.model_revision) == ("org/custom-llava", "abc")
    assert resolve_settings("kosmos2", env=env).model_path == "microsoft/kosmos-2-patch14-224"
    (tmp_path / "kosmos2").mkdir()
    local = resolve_settings("kosmos2", env={"VLM_MODELS_DIR": str(tmp_path)})
    assert (local.model_path, local.model_revision) == (str(tmp_path / "kosmos2"), None)
    assert resolve_settings("llava", env={"VLM_MODELS_DIR": str(tmp_path)}).model_path == MODELS["llava"][1]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"QUANTIZATION_TYPE": "int3"}, "quantization_type"),
        ({"MAX_NEW_TOKENS": "lots"}, "max_new_tokens"),
        ({"TOP_P": "0"}, "top_p"),
        ({"DTYPE": "float8"}, "dtype"),
    ],
)
def test_bad_settings_fail_with_the_setting_named(env, says):
    with pytest.raises(ModelConfigError, match=says):
        resolve_settings("llava", env=env)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ModelConfigError, match="moondream2, kosmos2, llava, qwen3-vl"):
        resolve_settings("gpt-4", env={})


def test_params_default_from_settings_and_are_range_checked():
    settings = resolve_settings("llava", env={"MAX_NEW_TOKENS": "40", "MAX_TOKENS_CAP": "50", "TEMPERATURE": "0.3"})
    params = resolve_params(settings)
    assert (params.max_tokens, params.temperature, params.top_p, params.greedy) == (40, 0.3, 1.0, False)
    assert resolve_params(settings, 50, 0.0, 0.5).greedy
    for kwargs, says in [
        ({"max_tokens": 0}, "between 1 and 50"),
        ({"max_tokens": True}, "integer"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "finite"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
    ]:
        with pytest.raises(InvalidParameter, match=says):
            resolve_params(settings, **kwargs)
    # well formed but above this model's cap: 413, not "malformed"
    with pytest.raises(MaxTokensTooLarge, match="between 1 and 50 for llava") as caught:
        resolve_params(settings, 51)
    assert caught.value.status == 413


def test_a_gpu_instance_runs_on_the_gpu_triton_assigned():
    from vlm_triton.placement import instance_device

    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == {"device": "cuda:3"}
    assert instance_device({"model_instance_kind": "MODEL", "model_instance_device_id": "0"}) == {}
    assert instance_device({"model_instance_kind": "CPU"}) == {}
