"""``make gpu-check``'s CPU path (issue 17): the script that measures the engine on a GPU must
not rot between the sessions that have one."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig

from benchmarks import gpu_check
from vlm_engine.kv.pool import kv_shape


def test_the_real_configs_are_the_published_models(tiny_models_dir, tmp_path):
    """The checkpoints the GPU run builds have the real models' KV size and vocabulary."""
    expected = {"qwen3-vl": (36 * 2 * 8 * 128 * 2, 151936, 27), "llava": (32 * 2 * 32 * 128 * 2, 32064, 24)}
    for model, (kv_bytes, vocab, vision_layers) in expected.items():
        folder = gpu_check.make_checkpoint(model, "real", tiny_models_dir, tmp_path)
        config = AutoConfig.from_pretrained(folder)
        assert kv_shape(config.text_config, torch.bfloat16).bytes_per_token == kv_bytes
        assert config.text_config.vocab_size == vocab
        vision = config.vision_config
        assert getattr(vision, "depth", None) or vision.num_hidden_layers == vision_layers
        assert not list(folder.glob("*.safetensors"))  # weights are made on the device


def test_the_cpu_path_measures_preempts_and_agrees(tiny_models_dir, tmp_path):
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--scale", "tiny", "--rows", "1", "4", "--generate-rows", "4"]
    argv += ["--agreement-rows", "4", "--max-tokens", "24", "--tiny-dir", str(tiny_models_dir)]
    argv += ["--work", str(tmp_path / "work"), "--out", str(out), "--strict"]
    assert gpu_check.main(argv) == 0  # --strict: batched and preempted rows agree exactly in float32
    report = json.loads(out.read_text())
    assert [m["model"] for m in report["models"]] == ["qwen3-vl", "llava"]
    for m in report["models"]:
        assert [t["rows"] for t in m["throughput"]] == [1, 4]
        for t in m["throughput"]:
            assert t["output_tokens"] == 24 * t["rows"] and t["decode_tok_s"] > 0 and t["bound_tok_s"] > 0
        assert m["throughput"][1]["generate_tok_s"] > 0
        assert m["preemption"]["preempted"] >= 1 and m["preemption"]["finished"] == 4
        assert m["kv_budget"]["tokens"] > 0 and m["greedy_agreement"]["exact_rows"] == 4
