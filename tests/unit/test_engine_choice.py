"""ENGINE=native|vllm (issue 28): which engine each model runs, and the repository Triton reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm_engine.engine import VLMEngine
from vlm_engine.errors import ModelConfigError
from vlm_engine.settings import resolve_engine, resolve_settings
from vlm_triton import repository, vllm_env

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "triton_models"


@pytest.mark.parametrize(
    ("name", "env", "configured", "engine"),
    [
        ("llava", {}, "native", "native"),
        ("llava", {"ENGINE": "vllm"}, "native", "vllm"),
        ("qwen3-vl", {"ENGINE": "vllm", "QWEN3_VL_ENGINE": "native"}, "native", "native"),
        ("qwen3-vl", {"QWEN3_VL_ENGINE": "vllm"}, "native", "vllm"),
        ("llava", {}, "vllm", "vllm"),
        ("kosmos2", {"ENGINE": "vllm"}, "native", "native"),  # the shared setting leaves it native
        ("moondream2", {"ENGINE": "VLLM"}, "native", "native"),
    ],
)
def test_each_model_gets_its_engine(name, env, configured, engine):
    assert resolve_engine(name, configured, env) == engine


@pytest.mark.parametrize(
    ("name", "env", "configured"),
    [("kosmos2", {"KOSMOS2_ENGINE": "vllm"}, "native"), ("moondream2", {}, "vllm")],
)
def test_vllm_is_refused_for_a_model_it_cannot_run(name, env, configured):
    with pytest.raises(ModelConfigError, match=f"{name} cannot run on ENGINE=vllm: vLLM has no {name} model"):
        resolve_engine(name, configured, env)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ModelConfigError, match="engine must be native or vllm, got 'tgi'"):
        resolve_settings("llava", env={"ENGINE": "tgi"})


def test_the_in_process_engine_refuses_vllm_settings():
    settings = resolve_settings("llava", env={"LLAVA_ENGINE": "vllm"})
    assert settings.engine == "vllm"
    with pytest.raises(ModelConfigError, match=r"ENGINE=vllm runs inside Triton.*LLAVA_ENGINE=native"):
        VLMEngine(settings, load=False)


def test_every_stream_config_names_its_engine_native_by_default():
    assert repository.engines(MODELS, env={}) == {
        "kosmos2_stream": "native",
        "llava_stream": "native",
        "moondream2_stream": "native",
        "qwen3-vl_stream": "native",
    }


def test_all_native_serves_the_repository_itself():
    assert repository.serving_repository(MODELS, env={}) == MODELS


@pytest.fixture
def fake_stub(tmp_path, monkeypatch):
    stub = tmp_path / "vllm" / "stub"
    (stub / "bin").mkdir(parents=True)
    (stub / "bin" / "python").touch()
    monkeypatch.setattr(vllm_env, "STUB", stub)
    monkeypatch.setattr(repository, "TRITON_HOME", tmp_path)
    return stub


def test_vllm_models_get_the_stub_environment_and_the_rest_are_links(fake_stub):
    served = repository.serving_repository(MODELS, env={"ENGINE": "vllm"})
    assert served.parent == fake_stub.parent.parent / "repositories"
    for model in ("llava_stream", "qwen3-vl_stream"):
        for config in (served / model / "config.pbtxt", served / model / "configs" / "gpu.pbtxt"):
            values = repository.parameters(config.read_text())
            assert values["engine"] == "vllm" and values["EXECUTION_ENV_PATH"] == str(fake_stub)
        assert (served / model / "1").resolve() == (MODELS / model / "1").resolve()
        source = repository.parameters((MODELS / model / "config.pbtxt").read_text())
        assert {k: v for k, v in values.items() if k not in ("engine", "EXECUTION_ENV_PATH")} == {
            k: v for k, v in source.items() if k != "engine"
        }
    for model in ("kosmos2_stream", "moondream2_stream", "llava", "qwen3-vl", "llm_decoupled"):
        assert (served / model).is_symlink() and (served / model).resolve() == (MODELS / model).resolve()
    assert repository.serving_repository(MODELS, env={"ENGINE": "vllm"}) == served  # written once, reused
    only_llava = repository.serving_repository(MODELS, env={"LLAVA_ENGINE": "vllm"})
    assert only_llava != served and (only_llava / "qwen3-vl_stream").is_symlink()


def test_a_missing_vllm_environment_stops_the_start_with_what_to_run(fake_stub):
    (fake_stub / "bin" / "python").unlink()
    with pytest.raises(SystemExit, match=r"ENGINE=vllm for llava_stream.*run `make vllm-env`"):
        repository.serving_repository(MODELS, env={"LLAVA_ENGINE": "vllm"})
