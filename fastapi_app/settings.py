"""Service settings, from the environment (and a ``.env`` file); see ``.env.example``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vlm_engine.settings import MODELS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", protected_namespaces=())

    inference_backend: Literal["triton", "local"] = "triton"
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_timeout_s: float = Field(300.0, gt=0, description="longest a generation may take")
    triton_retries: int = Field(
        4, ge=0, le=10, description="tries on another replica when one fails a stream before its first token"
    )
    triton_health_url: str | None = Field(
        None, description="vlm_triton.serve's health endpoint (http://host:8003): knows models whose stub died"
    )
    served_models: str = Field(",".join(MODELS), description="comma-separated model names offered")
    default_model: str = "qwen3-vl"
    # Local backend (the direct path): which models to load in-process; MODEL_PATH is the
    # seed's name for the weights when exactly one model is loaded.
    local_models: str = ""
    model_path: str | None = None
    # Request defaults (the seed's names); unset means the model's own defaults.
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens_cap: int = Field(
        1024, ge=1, description="largest max_tokens the API accepts (its OpenAPI maximum); the models' own cap"
    )
    max_inflight_per_model: int = Field(
        80, ge=1, description="generations per model in flight here; one more: 503 at once (MAX_RUNNING+MAX_WAITING)"
    )
    max_n: int = Field(
        4, ge=1, le=16, description="answers per request at most (n; the OpenAPI limit); match the models'"
    )
    max_images: int = Field(
        4, ge=1, le=64, description="images per request for llava and qwen3-vl (the OpenAPI limit); match the models'"
    )
    max_history: int = Field(10, ge=0, description="turns kept per session")
    history_db: Path = Field(
        Path(".run/data/history.sqlite3"), description="runtime data, git-ignored (the local stack's own file)"
    )
    history_busy_timeout_s: float = Field(10.0, gt=0, description="how long a write waits for a locked database")
    store_responses: bool = Field(
        True, description="keep Responses API answers (store: true) for GET and previous_response_id"
    )
    max_stored_responses: int = Field(10_000, ge=1, description="stored responses kept; the oldest go first")
    max_stored_responses_mb: int = Field(1024, ge=1, description="their size in all (images inline); oldest go first")
    max_response_chain: int = Field(
        64, ge=1, description="responses a previous_response_id conversation reaches back (more: truncation auto)"
    )
    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    api_keys: str = Field("", description="comma-separated API keys; set (or API_KEYS_FILE) turns auth on")
    api_keys_file: Path | None = Field(None, description="a file of API keys, one per line")
    allow_remote_images: bool = False
    remote_image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    remote_image_timeout_s: float = Field(10.0, gt=0)

    @field_validator("served_models", "local_models")
    @classmethod
    def _known(cls, value: str) -> str:
        unknown = [m for m in _split(value) if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
        return value

    @property
    def keys(self) -> tuple[str, ...]:
        from fastapi_app.auth import load_keys

        return load_keys(self.api_keys, self.api_keys_file)

    @property
    def models(self) -> list[str]:
        return _split(self.served_models)

    @property
    def local_model_list(self) -> list[str]:
        return _split(self.local_models) or self.models


def _split(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]
