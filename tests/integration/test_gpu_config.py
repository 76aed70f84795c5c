"""``TRITON_MODEL_CONFIG=gpu``: Triton reads each stream model's configs/gpu.pbtxt (one
instance per GPU) and the facades' config.pbtxt. Without a GPU here, the proof is Triton's
own refusal of the KIND_GPU instance group, next to the facade loaded from its usual file."""

from __future__ import annotations

import os
import subprocess

from tests.conftest import ARTIFACTS, TRITON_ENV, free_ports
from vlm_triton import gpu_configs, launch


def test_the_gpu_configs_are_written_from_the_usual_ones():
    assert gpu_configs.main(["--check"]) == 0
    for model_dir in gpu_configs.stream_models():
        text = (model_dir / "configs" / "gpu.pbtxt").read_text()
        assert gpu_configs.EVERY_GPU in text and "KIND_MODEL" not in text, model_dir.name
        assert f'name: "{model_dir.name}"' in text


def test_triton_reads_configs_gpu_pbtxt_where_there_is_one(tiny_models_dir):
    http, grpc, metrics = free_ports(3)
    command = launch.command(http_port=http, grpc_port=grpc, metrics_port=metrics, models=["llava", "llava_stream"])
    assert not any(arg.startswith("--model-config-name") for arg in command)
    command = launch.command(
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        models=["llava", "llava_stream"],
        model_config="gpu",
    )
    env = launch.environment(
        {**os.environ, **TRITON_ENV, "VLM_MODELS_DIR": str(tiny_models_dir), "HF_HUB_OFFLINE": "1"}
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    (ARTIFACTS / "tritonserver-gpu-config.log").write_text(output)
    assert done.returncode != 0
    assert "instance group llava_stream_0 of model llava_stream has kind KIND_GPU but no GPUs are available" in output
    assert "successfully loaded 'llava'" in output  # the facade: its config.pbtxt (KIND_CPU)
