import json

from transformers import AutoConfig

from vlm_engine.tiny import moondream_standin


def test_every_checkpoint_is_marked_tiny_and_gibberish(tiny_models_dir):
    for name in ["moondream2", "kosmos2", "llava", "qwen3-vl"]:
        folder = tiny_models_dir / name
        assert json.loads((folder / "tiny.json").read_text())["tiny"] is True
        assert "gibberish" in (folder / "README.md").read_text()
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size < 10_000_000, f"{name} is {size} bytes"


def test_moondream_stand_in_loads_through_trust_remote_code_and_says_what_it_is(tiny_models_dir):
    folder = tiny_models_dir / "moondream2"
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.auto_map["AutoModelForCausalLM"] == "hf_moondream.HfMoondream"
    assert (folder / "hf_moondream.py").read_text() == open(moondream_standin.__file__).read()
    assert "TEST STAND-IN" in moondream_standin.__doc__ and "NOT the real model" in moondream_standin.__doc__


def test_builds_are_reproducible(tmp_path):
    from vlm_engine.tiny.build import build

    first = build("llava", tmp_path / "a")
    second = build("llava", tmp_path / "b")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()
