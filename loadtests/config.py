"""Load-test settings, read from the environment (``loadtests.run`` turns its flags into these).

Plain Python, no locust import: the runner and the tests read the same settings without
gevent's monkey patching.

| Variable | Default | |
|---|---|---|
| ``HOST`` | ``http://localhost`` | the gateway (nginx); a bare ``host:port`` gets ``http://`` |
| ``USERS`` / ``SPAWN_RATE`` | 16 / 4 | simulated users, users started per second |
| ``DURATION`` | ``60s`` | ``90``, ``45s``, ``2m``, ``1m30s``, ``1h`` |
| ``PROFILE`` | ``mixed`` | ``infer``, ``stream``, ``chat``, ``mixed`` |
| ``MODELS`` | the four | comma or space separated |
| ``MAX_TOKENS`` | 32 | ``max_tokens`` of every request |
| ``WEIGHTS`` | ``infer=1,stream=1,chat=1`` | task weights of the mixed profile (0 drops a kind) |
| ``CHAT_TURNS`` | 3 | turns of one REST conversation before its history is cleared (0: never) |
| ``IMAGE_SIZES`` | ``64x48,320x240,1024x768`` | generated at start-up in every format |
| ``IMAGE_FORMATS`` | ``PNG,JPEG,WEBP`` | |
| ``WAIT`` | ``0`` | seconds between a user's requests: ``0.5`` or a range ``0.5-2`` |
| ``REQUEST_TIMEOUT`` | 300 | seconds |
| ``KSERVE_BINARY`` | 0 | 1: KServe bodies with the binary tensor extension (tritonclient) instead of JSON |
| ``STOP_TIMEOUT`` | 30 | seconds users get to finish a request in flight when the time is up |
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

ALL_MODELS = ("moondream2", "kosmos2", "llava", "qwen3-vl")

# Task kinds and the endpoint label each one records (locust name "<endpoint> <model>").
KINDS = ("infer", "stream", "chat")
ENDPOINTS = {
    "infer": "kserve-infer",  # POST /v2/models/<model>/infer
    "stream": "openai-stream",  # POST /v1/chat/completions, stream: true
    "chat": "rest-chat",  # POST /api/chat
}
CHAT_RESET = "rest-chat-reset"  # DELETE /api/sessions/<id> after CHAT_TURNS turns
# Request types of the measurements that are not requests (locust entries of their own).
TTFT, ITL = "TTFT", "ITL"
MEASUREMENT_TYPES = (TTFT, ITL)

# profile -> the locust user classes it runs
PROFILES = {
    "infer": ["KServeInferUser"],
    "stream": ["OpenAIStreamUser"],
    "chat": ["RestChatUser"],
    "mixed": ["MixedUser"],
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which and why."""


def parse_duration(text: str | float | int) -> float:
    """``60``, ``60s``, ``2m``, ``1m30s``, ``1h`` -> seconds."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", raw):
            seconds = float(raw)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", raw)
            if not parts or "".join(n + u for n, u in parts) != raw:
                raise ConfigError(f"DURATION {text!r}: use e.g. 60s, 2m, 1m30s, 1h or plain seconds")
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise ConfigError(f"DURATION {text!r} must be above zero")
    return seconds


def parse_models(text: str | None) -> list[str]:
    if not text or not text.strip():
        return list(ALL_MODELS)
    models = [m for m in re.split(r"[,\s]+", text.strip()) if m]
    return list(dict.fromkeys(models))


def parse_weights(text: str | None) -> dict[str, int]:
    """``infer=2,stream=1,chat=1`` (kinds left out weigh 0 when any is given)."""
    if not text or not text.strip():
        return {kind: 1 for kind in KINDS}
    weights = dict.fromkeys(KINDS, 0)
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in weights:
            raise ConfigError(f"WEIGHTS {text!r}: use e.g. infer=2,stream=1,chat=1 (kinds: {', '.join(KINDS)})")
        try:
            weights[key] = int(value)
        except ValueError:
            raise ConfigError(f"WEIGHTS {text!r}: {key} must be a whole number, got {value!r}") from None
        if weights[key] < 0:
            raise ConfigError(f"WEIGHTS {text!r}: {key} must not be negative")
    if not any(weights.values()):
        raise ConfigError(f"WEIGHTS {text!r}: at least one weight must be above zero")
    return weights


def weighted_schedule(weights: dict[str, int]) -> list[str]:
    """One round of smooth weighted round-robin (nginx's): each kind as often as its weight,
    spread out. ``{"infer": 2, "stream": 1, "chat": 1}`` -> infer, stream, chat, infer."""
    active = {kind: w for kind, w in weights.items() if w > 0}
    current = dict.fromkeys(active, 0)
    total, order = sum(active.values()), []
    for _ in range(total):
        for kind, weight in active.items():
            current[kind] += weight
        chosen = max(active, key=lambda kind: current[kind])
        current[chosen] -= total
        order.append(chosen)
    return order


def parse_sizes(text: str | None) -> list[tuple[int, int]]:
    sizes = []
    for item in re.split(r"[,\s]+", (text or "").strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)[x*](\d+)", item.lower())
        if not match or not all(int(v) > 0 for v in match.groups()):
            raise ConfigError(f"IMAGE_SIZES {text!r}: use e.g. 64x48,320x240,1024x768")
        sizes.append((int(match[1]), int(match[2])))
    if not sizes:
        raise ConfigError("IMAGE_SIZES is empty")
    return sizes


def parse_formats(text: str | None) -> list[str]:
    formats = [f.upper().replace("JPG", "JPEG") for f in re.split(r"[,\s]+", (text or "").strip()) if f]
    bad = [f for f in formats if f not in ("PNG", "JPEG", "WEBP")]
    if bad or not formats:
        raise ConfigError(f"IMAGE_FORMATS {text!r}: choose from PNG, JPEG, WEBP")
    return list(dict.fromkeys(formats))


def parse_wait(text: str | None) -> tuple[float, float]:
    raw = (text or "0").strip()
    low, _, high = raw.partition("-")
    try:
        bounds = (float(low), float(high or low))
    except ValueError:
        raise ConfigError(f"WAIT {text!r}: seconds, e.g. 0, 0.5 or 0.5-2") from None
    if bounds[0] < 0 or bounds[1] < bounds[0]:
        raise ConfigError(f"WAIT {text!r}: need 0 <= low <= high")
    return bounds


def normalise_host(host: str | None) -> str:
    host = (host or "").strip() or "http://localhost"
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def _int(env, name: str, default: int, low: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < low:
        raise ConfigError(f"{name}={value} must be at least {low}")
    return value


def _float(env, name: str, default: float, low: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < low:
        raise ConfigError(f"{name}={value} must be at least {low}")
    return value


@dataclass
class Settings:
    host: str = "http://localhost"
    users: int = 16
    spawn_rate: float = 4.0
    duration_s: float = 60.0
    profile: str = "mixed"
    models: list[str] = field(default_factory=lambda: list(ALL_MODELS))
    max_tokens: int = 32
    weights: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 1))
    chat_turns: int = 3
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(64, 48), (320, 240), (1024, 768)])
    image_formats: list[str] = field(default_factory=lambda: ["PNG", "JPEG", "WEBP"])
    wait: tuple[float, float] = (0.0, 0.0)
    request_timeout_s: float = 300.0
    kserve_binary: bool = False
    stop_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        profile = env.get("PROFILE", "").strip().lower() or "mixed"
        if profile not in PROFILES:
            raise ConfigError(f"PROFILE {profile!r}: choose from {', '.join(PROFILES)}")
        return cls(
            host=normalise_host(env.get("HOST")),
            users=_int(env, "USERS", 16, low=1),
            spawn_rate=_float(env, "SPAWN_RATE", 4.0, low=0.001),
            duration_s=parse_duration(env.get("DURATION", "").strip() or "60s"),
            profile=profile,
            models=parse_models(env.get("MODELS")),
            max_tokens=_int(env, "MAX_TOKENS", 32, low=1),
            weights=parse_weights(env.get("WEIGHTS")),
            chat_turns=_int(env, "CHAT_TURNS", 3, low=0),
            image_sizes=parse_sizes(env.get("IMAGE_SIZES") or "64x48,320x240,1024x768"),
            image_formats=parse_formats(env.get("IMAGE_FORMATS") or "PNG,JPEG,WEBP"),
            wait=parse_wait(env.get("WAIT")),
            request_timeout_s=_float(env, "REQUEST_TIMEOUT", 300.0, low=0.001),
            kserve_binary=env.get("KSERVE_BINARY", "").strip().lower() in ("1", "true", "yes", "on"),
            stop_timeout_s=_float(env, "STOP_TIMEOUT", 30.0),
        )

    def as_dict(self) -> dict:
        return {
            "host": self.host,
            "users": self.users,
            "spawn_rate": self.spawn_rate,
            "duration_s": self.duration_s,
            "profile": self.profile,
            "models": self.models,
            "max_tokens": self.max_tokens,
            "weights": self.weights if self.profile == "mixed" else None,
            "chat_turns": self.chat_turns,
            "image_sizes": [f"{w}x{h}" for w, h in self.image_sizes],
            "image_formats": self.image_formats,
            "wait_s": list(self.wait),
            "kserve_binary": self.kserve_binary,
        }
