"""Generation parameters: defaults from settings, per-request values validated here."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlm_engine.errors import InvalidParameter, MaxTokensTooLarge
from vlm_engine.settings import ModelSettings


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve_params(
    settings: ModelSettings,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> GenerationParams:
    """Fill unset values from ``settings`` and check every value's range."""
    cap = settings.max_tokens_cap
    if max_tokens is None:
        max_tokens = min(settings.max_new_tokens, cap)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidParameter(f"max_tokens must be an integer, got {max_tokens!r}")
    if max_tokens < 1:
        raise InvalidParameter(f"max_tokens must be between 1 and {cap}, got {max_tokens}")
    if max_tokens > cap:
        raise MaxTokensTooLarge(f"max_tokens must be between 1 and {cap} for {settings.name}, got {max_tokens}")
    temperature = settings.temperature if temperature is None else temperature
    top_p = settings.top_p if top_p is None else top_p
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParameter(f"{name} must be a finite number, got {value!r}")
    if not 0.0 <= temperature <= 2.0:
        raise InvalidParameter(f"temperature must be between 0 and 2 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidParameter(f"top_p must be in (0, 1], got {top_p}")
    return GenerationParams(int(max_tokens), float(temperature), float(top_p))
