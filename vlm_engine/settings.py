"""Model settings: built-in defaults < Triton ``parameters`` < environment variables.

Every setting has a lower-case key (the Triton config parameter) and an upper-case
environment name. A model-specific variable (``LLAVA_MAX_NEW_TOKENS``; ``QWEN3_VL_...`` for
``qwen3-vl``) beats the shared one (``MAX_NEW_TOKENS``). The weights' source
(``MODEL_PATH``, ``MODEL_REVISION``) is only read model-specifically, plus
``VLM_MODELS_DIR``: a folder holding one checkpoint folder per model name (the tiny
checkpoints use it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from vlm_engine.errors import ModelConfigError

Architecture = Literal["llava", "kosmos2", "qwen3_vl", "moondream2"]

# model name -> (architecture, default weights, pinned revision)
MODELS: dict[str, tuple[Architecture, str, str | None]] = {
    "moondream2": ("moondream2", "vikhyatk/moondream2", "2025-06-21"),
    "kosmos2": ("kosmos2", "microsoft/kosmos-2-patch14-224", None),
    "llava": ("llava", "llava-hf/llava-1.5-7b-hf", None),
    "qwen3-vl": ("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", None),
}
MULTI_IMAGE = ("llava", "qwen3_vl")  # architectures that take several images (MAX_IMAGES); the rest one
TOOL_FORMAT = ("qwen3_vl",)  # architectures whose prompt format has tools (vlm_engine.tools)
VLLM_ARCHITECTURES = ("llava", "qwen3_vl")  # what ENGINE=vllm can serve (vLLM has no Kosmos-2 or moondream2)
Engine = Literal["native", "vllm"]
SOURCE_KEYS = ("model_path", "model_revision", "tokenizer_repo", "tokenizer_revision")


class ModelSettings(BaseModel):
    """Everything the engine needs to load and serve one model."""

    name: str
    architecture: Architecture
    model_path: str = Field(description="HF model id or local directory")
    model_revision: str | None = None
    hf_cache_dir: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    engine: Engine = Field(
        "native",
        description="native: this project's engine; vllm: vLLM's AsyncLLM in its own environment, inside "
        "Triton (llava, qwen3-vl; make vllm-env). The shared ENGINE leaves kosmos2 and moondream2 native",
    )
    quantization_type: Literal["none", "int8", "int4"] = "none"
    cpu_threads: int | None = Field(
        None, ge=1, description="CPU: torch threads of the engine; default half the cores (the server keeps the rest)"
    )
    prepare_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="llava, kosmos2, qwen3-vl: processes that decode images and tokenize requests, off the "
        "engine's GIL (0: threads of the engine's process); default 1 up to 4 cores, else cores/4 (at most 4)",
    )
    attention_impl: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    max_new_tokens: int = Field(128, ge=1, description="default when a request sets none")
    max_tokens_cap: int = Field(1024, ge=1, description="largest max_tokens a request may ask")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_image_pixels: int = Field(25_000_000, ge=1, description="decompression-bomb guard")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_n: int = Field(4, ge=1, le=16, description="answers per request at most (n); the prompt is prefilled once")
    max_images: int = Field(
        4, ge=1, le=64, description="images per request, all turns (qwen3-vl, llava; kosmos2 and moondream2 take 1)"
    )
    warmup: bool = True
    scheduler: Literal["inflight", "static"] = Field(
        "inflight", description="inflight: rows join and leave at every step; static: whole batches (comparison)"
    )
    ignore_eos: bool = Field(False, description="benchmarks only: every answer runs to max_tokens")
    max_running: int = Field(16, ge=1, description="rows decoding together at most")
    max_waiting: int = Field(64, ge=1, description="requests queued beyond that are refused (503)")
    stream_interval: int = Field(1, ge=1, description="tokens per streamed chunk at most (1: every token)")
    stream_gap_ms: float = Field(
        40.0,
        ge=0,
        le=1000,
        description="a row's streamed text at most once per this many ms (its first at once); 0: every STREAM_INTERVAL",
    )
    row_trace_file: str | None = Field(
        None, description="debugging: append a JSON line per finished request (its times, each token's) to this file"
    )
    prefill_budget: int = Field(
        512, ge=1, description="prompt tokens a step carries at most, in chunks beside the decode rows"
    )
    kv_cache_mb: int | None = Field(
        None, ge=1, description="KV cache size; default: CUDA by GPU_MEMORY_UTILIZATION, CPU MAX_RUNNING full rows"
    )
    kv_cache_tokens: int | None = Field(
        None, ge=1, description="KV cache size in tokens (beats KV_CACHE_MB): tests and benchmarks"
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="CUDA: the share of the device that weights, activations and KV may use"
    )
    kv_page_tokens: int = Field(16, ge=1, le=1024, description="tokens per page of the KV cache")
    paged_attention: Literal["auto", "gather"] = Field(
        "auto",
        description="auto: KV pages read in place where a kernel exists (CPU: decode rows, built once; "
        "CUDA bf16/fp16: every row, with flashinfer where installed); gather",
    )
    compile_step: Literal["auto", "true", "all", "false"] = Field(
        "auto",
        description="decode steps run the model through torch.compile (inductor; compiled while warming up); "
        "all: steps carrying prompt chunks too (llava, qwen3-vl; 4-8 s more warm-up); "
        "auto: on CPU decode steps, on CUDA not yet (measured by make gpu-check first)",
    )
    prefix_caching: bool = Field(
        True, description="share the KV pages of prompts that start the same way (by hash, images included)"
    )
    prefill_step_multiple: float = Field(
        4.0,
        ge=0,
        description="a step carrying prompt chunks takes about this many decode steps (0: PREFILL_BUDGET alone)",
    )
    prefill_gather_steps: int = Field(
        4,
        ge=0,
        le=64,
        description="while rows decode, a new prompt with an image not yet encoded waits up to this many steps "
        "for others, so that one vision-encoder call takes them all; 0: each prompt at once",
    )
    max_image_tokens: int = Field(
        4096, ge=4, le=16384, description="qwen3-vl: image tokens at most; larger images are scaled down"
    )
    max_queue_wait_s: float = Field(60.0, gt=0, description="a request waiting longer for admission gets 503")
    # moondream2 only: the tokenizer its code fetches separately, kept images, grounding
    tokenizer_repo: str | None = Field(None, description="moondream2: default moondream/starmie-v1")
    tokenizer_revision: str | None = Field(None, description="moondream2: default the pinned commit")
    encoded_images: int = Field(
        4, ge=0, description="encoded images kept by content for later requests and chunks (0: none)"
    )
    encoder_cache_mb: int = Field(
        256, ge=0, description="llava, kosmos2, qwen3-vl: the encoded images kept hold at most this much"
    )
    max_objects: int = Field(50, ge=1, le=200, description="moondream2: boxes or points a /detect or /point returns")

    @property
    def env_prefix(self) -> str:
        return env_prefix(self.name)


def env_prefix(name: str) -> str:
    """``qwen3-vl`` -> ``QWEN3_VL``."""
    return name.upper().replace("-", "_")


def resolve_settings(
    name: str,
    parameters: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ModelSettings:
    """Merge defaults, Triton ``parameters`` and the environment into ``ModelSettings``."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    env = os.environ if env is None else env
    architecture, default_path, default_revision = MODELS[name]
    values: dict[str, object] = {
        "name": name,
        "architecture": architecture,
        "model_path": default_path,
        "model_revision": default_revision,
    }
    values.update({k: v for k, v in (parameters or {}).items() if v != ""})
    models_dir = env.get("VLM_MODELS_DIR")
    if models_dir and (Path(models_dir) / name).is_dir():
        values["model_path"] = str(Path(models_dir) / name)
        values["model_revision"] = None
    prefix = env_prefix(name)
    for key in ModelSettings.model_fields:
        if key in ("name", "architecture"):
            continue
        names = [f"{prefix}_{key.upper()}"]
        if key not in SOURCE_KEYS:
            names.append(key.upper())
        for env_name in names:
            if env.get(env_name, "") != "":
                values[key] = env[env_name]
                break
    values["engine"] = resolve_engine(name, (parameters or {}).get("engine") or "native", env)
    try:
        return ModelSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise ModelConfigError(f"invalid settings for model {name!r}: {problems}") from exc


def resolve_engine(name: str, configured: str = "native", env: Mapping[str, str] | None = None) -> str:
    """The model's engine: ``<PREFIX>_ENGINE`` beats the shared ``ENGINE``, which beats the
    configured one. vLLM cannot run Kosmos-2 or moondream2: asking for it by the model's own
    variable (or its config) is refused; the shared ``ENGINE=vllm`` leaves them native."""
    env = os.environ if env is None else env
    architecture = MODELS[name][0]
    own = env.get(f"{env_prefix(name)}_ENGINE", "")
    shared = env.get("ENGINE", "")
    engine = (own or shared or configured).strip().lower()
    if engine not in ("native", "vllm"):
        where = f"ENGINE, {env_prefix(name)}_ENGINE"
        raise ModelConfigError(f"{name}: engine must be native or vllm, got {engine!r} ({where})")
    if engine == "vllm" and architecture not in VLLM_ARCHITECTURES:
        if not own and shared:
            return "native"
        raise ModelConfigError(
            f"{name} cannot run on ENGINE=vllm: vLLM has no {name} model; set {env_prefix(name)}_ENGINE=native "
            f"(vllm serves {', '.join(n for n, m in MODELS.items() if m[0] in VLLM_ARCHITECTURES)})"
        )
    return engine
