"""Shared fixtures: tiny checkpoints, test images, free ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vlm_engine.tiny.samples import sample_image as image_bytes
from vlm_stack.procs import free_port
from vlm_triton.launch import TritonProcess

__all__ = ["free_port", "image_bytes"]

# Tests never reach a model hub: everything loads from local folders.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """The tiny checkpoints (``make tiny-models``), built here if they are missing."""
    from vlm_engine.tiny.build import main as build

    path = Path(os.environ.get("VLM_MODELS_DIR", ROOT / ".models" / "tiny"))
    build(["--out", str(path)])
    return path


@pytest.fixture(scope="session")
def png() -> bytes:
    return image_bytes((160, 120), "PNG")


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    return image_bytes((97, 211), "JPEG", (20, 120, 220))


# Small limits so that the limit checks are cheap to exercise; they are settings like any other.
TRITON_ENV = {"MAX_IMAGE_PIXELS": "1000000", "MAX_PROMPT_TOKENS": "512", "MAX_TOKENS_CAP": "64"}


def start_triton(models_dir: Path, log_name: str, models: list[str] | None = None, **ports) -> TritonProcess:
    """A real tritonserver on 127.0.0.1 serving triton_models/ with the tiny checkpoints."""
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(), **ports}
    server = TritonProcess(
        ARTIFACTS / log_name,
        env={"VLM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", **TRITON_ENV},
        models=models,
        **ports,
    ).start()
    try:
        server.wait_ready(timeout_s=300)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def triton(tiny_models_dir):
    server = start_triton(tiny_models_dir, "tritonserver.log")
    yield server
    server.stop()
