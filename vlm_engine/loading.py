"""Where and how weights are loaded: device, dtype, quantization, source checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm_engine.errors import ModelConfigError
from vlm_engine.settings import ModelSettings


def resolve_device(settings: ModelSettings) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if settings.device != "auto":
        if settings.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelConfigError(f"DEVICE={settings.device} but no CUDA GPU is visible")
        return settings.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads(settings: ModelSettings) -> int:
    """Torch's threads for a model on CPU (``CPU_THREADS``): half the cores by default, so the
    server around the engine (Triton, the service, nginx) keeps the rest, as vLLM's CPU build
    keeps a core for its API server (measured on 2 cores: 1 thread serves 20-25% more tokens/s
    through the stack than 2)."""
    import os

    return settings.cpu_threads or max(1, (os.cpu_count() or 2) // 2)


def resolve_dtype(settings: ModelSettings, device: str):
    """``auto`` -> bfloat16 (or float16) on GPU, float32 on CPU."""
    import torch

    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_source(settings: ModelSettings) -> None:
    """A path-like ``model_path`` must exist; hub ids are checked by ``from_pretrained``."""
    path = settings.model_path
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ModelConfigError(
            f"model folder {path!r} for {settings.name} does not exist; set "
            f"{settings.env_prefix}_MODEL_PATH to a checkpoint folder or a Hugging Face id"
        )


def source_kwargs(settings: ModelSettings) -> dict[str, Any]:
    """Where a checkpoint's files come from: the ``from_pretrained`` arguments of a processor,
    tokenizer or config (no weights)."""
    return {"revision": settings.model_revision, "cache_dir": settings.hf_cache_dir}


def from_pretrained_kwargs(settings: ModelSettings, device: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments shared by every ``from_pretrained`` call of the engine."""
    kwargs: dict[str, Any] = {
        **source_kwargs(settings),
        "dtype": resolve_dtype(settings, device),
    }
    if trust_remote_code:  # remote code picks its own attention; it may reject the argument
        kwargs["trust_remote_code"] = True
    else:
        kwargs["attn_implementation"] = settings.attention_impl
    if settings.quantization_type != "none":
        kwargs["quantization_config"] = quantization_config(settings, device)
        kwargs["device_map"] = {"": device}
    return kwargs


def quantization_config(settings: ModelSettings, device: str):
    """bitsandbytes int8/int4; these kernels need a CUDA GPU."""
    if not device.startswith("cuda"):
        raise ModelConfigError(
            f"QUANTIZATION_TYPE={settings.quantization_type} needs a CUDA GPU (bitsandbytes); "
            "this host runs on CPU: set QUANTIZATION_TYPE=none"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelConfigError(
            f"QUANTIZATION_TYPE={settings.quantization_type} needs the bitsandbytes package: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    if settings.quantization_type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=resolve_dtype(settings, device))


def load_error(settings: ModelSettings, exc: Exception) -> ModelConfigError:
    """Turn a loading failure into a message that says what to do."""
    return ModelConfigError(
        f"could not load {settings.name} from {settings.model_path!r}"
        f"{f' (revision {settings.model_revision})' if settings.model_revision else ''}: {exc}. "
        f"Download it with `make models MODELS={settings.name}` or set "
        f"{settings.env_prefix}_MODEL_PATH to a local checkpoint folder"
    )
