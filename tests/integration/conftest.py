"""A real tritonserver on 127.0.0.1 serving triton_models/ with the tiny checkpoints."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS, free_port
from vlm_triton.launch import TritonProcess

# Small limits so that the limit checks are cheap to exercise; they are settings like any other.
SERVER_ENV = {"MAX_IMAGE_PIXELS": "1000000", "MAX_PROMPT_TOKENS": "512", "MAX_TOKENS_CAP": "64"}


@pytest.fixture(scope="session")
def triton(tiny_models_dir):
    server = TritonProcess(
        ARTIFACTS / "tritonserver.log",
        env={"VLM_MODELS_DIR": str(tiny_models_dir), "HF_HUB_OFFLINE": "1", **SERVER_ENV},
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    ).start()
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()
