import pytest

from vlm_engine.download import Download, main, plan
from vlm_engine.errors import ModelConfigError
from vlm_engine.loading import check_source, quantization_config, resolve_device
from vlm_engine.settings import resolve_settings


def test_plan_covers_all_four_with_the_pinned_moondream_revision_and_its_tokenizer():
    todo = plan([], env={})
    assert [d.name for d in todo] == ["moondream2", "moondream2 tokenizer", "kosmos2", "llava", "qwen3-vl"]
    assert todo[0] == Download("moondream2", "vikhyatk/moondream2", "2025-06-21", None)
    pinned = "35192e10a54e36eabe0a7cc57a2c1aab371cafc5"
    assert todo[1] == Download("moondream2 tokenizer", "moondream/starmie-v1", pinned, None)


def test_the_moondream2_tokenizer_goes_to_the_configured_cache_even_for_local_weights(tiny_models_dir, tmp_path):
    env = {"MOONDREAM2_MODEL_PATH": str(tmp_path), "HF_CACHE_DIR": "/cache"}
    assert [(d.repo_id, d.cache_dir) for d in plan(["moondream2"], env=env)] == [("moondream/starmie-v1", "/cache")]
    env["MOONDREAM2_MODEL_PATH"] = str(tiny_models_dir / "moondream2")  # it carries a copy: nothing to fetch
    assert plan(["moondream2"], env=env) == []


def test_plan_follows_overrides_and_skips_local_folders():
    env = {"LLAVA_MODEL_PATH": "llava-hf/llava-1.5-13b-hf", "HF_CACHE_DIR": "/cache", "KOSMOS2_MODEL_PATH": "/models/k"}
    assert plan(["llava", "kosmos2"], env=env) == [Download("llava", "llava-hf/llava-1.5-13b-hf", None, "/cache")]


def test_cli_downloads_what_it_plans(capsys, monkeypatch):
    for var in ("VLM_MODELS_DIR", "QWEN3_VL_MODEL_PATH", "QWEN3_VL_MODEL_REVISION"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    assert main(["qwen3-vl"], download=lambda **kw: calls.append(kw) or "/cache/q") == 0
    assert calls == [{"repo_id": "Qwen/Qwen3-VL-8B-Instruct", "revision": None, "cache_dir": None}]
    assert "qwen3-vl: in /cache/q" in capsys.readouterr().out
    assert main(["--dry-run", "llava"], download=lambda **kw: pytest.fail("dry run downloaded")) == 0


def test_cli_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["llava", "gpt-4"])
    assert exit_info.value.code == 2
    assert "unknown model(s) ['gpt-4']" in capsys.readouterr().err


def test_quantization_on_cpu_is_a_clear_error():
    settings = resolve_settings("llava", env={"QUANTIZATION_TYPE": "int4"})
    with pytest.raises(ModelConfigError, match=r"needs a CUDA GPU.*QUANTIZATION_TYPE=none"):
        quantization_config(settings, "cpu")


def test_device_auto_is_cpu_here_and_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        assert resolve_device(resolve_settings("llava", env={})) == "cuda"
    else:
        assert resolve_device(resolve_settings("llava", env={})) == "cpu"
        with pytest.raises(ModelConfigError, match="no CUDA GPU"):
            resolve_device(resolve_settings("llava", env={"DEVICE": "cuda"}))


def test_missing_local_folder_names_the_variable():
    with pytest.raises(ModelConfigError, match="LLAVA_MODEL_PATH"):
        check_source(resolve_settings("llava", env={"LLAVA_MODEL_PATH": "/no/such/folder"}))


def test_hub_model_missing_offline_says_how_to_get_it(tmp_path):
    from vlm_engine.engine import VLMEngine

    settings = resolve_settings("llava", env={"LLAVA_MODEL_PATH": "org/not-downloaded", "HF_CACHE_DIR": str(tmp_path)})
    with pytest.raises(ModelConfigError, match="make models MODELS=llava"):
        VLMEngine(settings)
