"""Generation parameters: defaults from settings, per-request values validated here."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm_engine.errors import InvalidParameter, MaxTokensTooLarge
from vlm_engine.settings import ModelSettings

MAX_STOP = 4
MAX_STOP_CHARS = 200
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 1000
MAX_GUIDE_CHARS = 65536  # a schema's JSON text, a regex, all choices together
MAX_CHOICES = 256
GUIDE_KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_LOGIT_BIAS = 1024  # token ids per request (vLLM's GPU sampler takes as many)
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
# a token id as JSON object keys carry it: decimal, no sign, no leading zero (so no two keys
# name one token), at most 18 digits (past every vocabulary; int() of it is cheap)
TOKEN_ID_KEY = re.compile(r"(?:0|[1-9][0-9]{0,17})", re.ASCII)


@dataclass(frozen=True)
class Guide:
    """Structured output: the answer must match this (``spec``: the JSON schema as JSON text, the
    regex, the choices as a JSON list, or a Lark grammar the engine made: ``kind`` "lark")."""

    kind: str
    spec: str

    def describe(self) -> str:
        names = {"json_object": "the JSON object format", "lark": "the tool-call grammar (tools' parameters)"}
        return names.get(self.kind, f"the {self.kind.replace('_', ' ')} guide")


def resolve_guide(value: Any) -> Guide:
    """A ``Guide`` from ``{"json_schema": {...}}``, ``{"json_object": true}``, ``{"regex": "..."}``
    or ``{"choice": ["...", ...]}`` (exactly one key)."""
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in GUIDE_KINDS:
        raise InvalidParameter(f"guide must be an object with exactly one of {list(GUIDE_KINDS)}, got {value!r:.200}")
    kind, spec = next(iter(value.items()))
    if kind == "json_object":
        if spec is not True:
            raise InvalidParameter("guide.json_object must be true")
        text = json.dumps({"type": "object"})
    elif kind == "json_schema":
        if not isinstance(spec, Mapping):
            raise InvalidParameter(f"guide.json_schema must be a JSON schema object, got {type(spec).__name__}")
        text = json.dumps(spec, separators=(",", ":"))
    elif kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise InvalidParameter("guide.regex must be a non-empty string")
        text = spec
    else:
        if (
            not isinstance(spec, list)
            or not 0 < len(spec) <= MAX_CHOICES
            or not all(isinstance(c, str) and c for c in spec)
        ):
            raise InvalidParameter(f"guide.choice must be a list of 1 to {MAX_CHOICES} non-empty strings")
        text = json.dumps(spec)
    if len(text) > MAX_GUIDE_CHARS:
        raise InvalidParameter(f"guide.{kind} is {len(text)} characters, above the limit of {MAX_GUIDE_CHARS}")
    return Guide(kind, text)


@dataclass(frozen=True)
class Sampling:
    """Per-row options beyond temperature and top_p (OpenAI's names; ``repetition_penalty`` as
    in transformers and vLLM). ``seed`` makes a sampled row's draws its own: the same request
    and seed give the same text whatever else runs in the batch."""

    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    guide: Guide | None = None  # structured output
    # OpenAI's logit_bias: (token id, bias) pairs by id, each added to that token's score before
    # penalties, guide and temperature (a tuple: the options stay immutable and hashable); the
    # ids are checked against the model's vocabulary where it is known (``VLMEngine.prepare``)
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = 0  # sampled rows: only the k likeliest tokens (0: all), before temperature and top-p

    @property
    def penalised(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    temperature: float
    top_p: float
    sampling: Sampling = field(default_factory=Sampling)
    raw_prompt: bool = False  # the user message's text is the whole prompt: no chat template

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve_params(
    settings: ModelSettings,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    sampling: Mapping[str, Any] | Sampling | None = None,
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
        _number(name, value)
    if not 0.0 <= temperature <= 2.0:
        raise InvalidParameter(f"temperature must be between 0 and 2 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidParameter(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(sampling, Sampling):
        sampling = resolve_sampling(sampling or {})
    return GenerationParams(int(max_tokens), float(temperature), float(top_p), sampling)


def resolve_sampling(values: Mapping[str, Any]) -> Sampling:
    """``Sampling`` from request values (``None`` means unset); each range is checked."""
    values = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - set(Sampling.__dataclass_fields__))
    if unknown:
        raise InvalidParameter(f"unknown sampling parameter(s) {unknown}; known: {list(Sampling.__dataclass_fields__)}")
    seed = values.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise InvalidParameter(f"seed must be an integer, got {seed!r}")
    stop = values.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise InvalidParameter(
            f"stop takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters, got {stop!r}"
        )
    penalties = {}
    for name, low, high, default in (
        ("frequency_penalty", -2.0, 2.0, 0.0),
        ("presence_penalty", -2.0, 2.0, 0.0),
        ("repetition_penalty", 0.0, 2.0, 1.0),
    ):
        value = values.get(name, default)
        _number(name, value)
        if not low <= value <= high or (name == "repetition_penalty" and value == 0):
            span = "(0, 2]" if name == "repetition_penalty" else f"[{low:g}, {high:g}]"
            raise InvalidParameter(f"{name} must be in {span}, got {value}")
        penalties[name] = float(value)
    logprobs = values.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise InvalidParameter(f"logprobs must be true or false, got {logprobs!r}")
    top = values.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidParameter(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    if top and not logprobs:
        raise InvalidParameter("top_logprobs needs logprobs set to true")
    guide = values.get("guide")
    if guide is not None and not isinstance(guide, Guide):
        guide = resolve_guide(guide)
    bias = resolve_logit_bias(values.get("logit_bias"))
    top_k = values.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= MAX_TOP_K:
        raise InvalidParameter(f"top_k must be an integer from 0 (all tokens) to {MAX_TOP_K}, got {top_k!r}")
    return Sampling(
        seed, stop, logprobs=logprobs, top_logprobs=top, guide=guide, logit_bias=bias, top_k=top_k, **penalties
    )


def resolve_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` as ``Sampling`` keeps it: ``{"50": -100, ...}`` (JSON keys are
    strings; int keys are taken too) -> ``((50, -100.0), ...)`` sorted by id. Each key is a token
    id, each bias a finite number in [-100, 100], at most ``MAX_LOGIT_BIAS`` of them; whether
    an id is in the model's vocabulary is ``check_logit_bias``'s (it needs the model)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidParameter(
            f'logit_bias must be an object of token ids to biases (e.g. {{"50": -100}}), got {type(value).__name__}'
        )
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidParameter(f"logit_bias takes at most {MAX_LOGIT_BIAS} token ids, got {len(value)}")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        if isinstance(key, str) and TOKEN_ID_KEY.fullmatch(key):
            token = int(key)
        elif isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            token = key
        else:
            raise InvalidParameter(
                f'logit_bias keys must be token ids, integers from 0 written in decimal (e.g. "50"), got {_shown(key)}'
            )
        if token in biases:
            raise InvalidParameter(f"logit_bias names token {token} twice")
        if (
            isinstance(bias, bool)
            or not isinstance(bias, (int, float))
            or not math.isfinite(bias)
            or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT
        ):
            raise InvalidParameter(
                f"logit_bias[{_shown(key)}] must be a number from -{LOGIT_BIAS_LIMIT:g} to {LOGIT_BIAS_LIMIT:g}, "
                f"got {_shown(bias)}"
            )
        biases[token] = float(bias)
    return tuple(sorted(biases.items()))


def check_logit_bias(sampling: Sampling, vocab_size: int, model: str) -> None:
    """Every ``logit_bias`` id is a row of the model's scores (0 to ``vocab_size`` - 1: the text
    model's ``vocab_size``, the width of its scores, as vLLM checks it)."""
    outside = [token for token, _ in sampling.logit_bias if token >= vocab_size]
    if outside:
        shown = ", ".join(map(str, outside[:5])) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        raise InvalidParameter(
            f"logit_bias has token id(s) outside {model}'s vocabulary: {shown} "
            f"(vocabulary size {vocab_size}: ids 0 to {vocab_size - 1})"
        )


def _shown(value: Any) -> str:
    """``value`` in an error message, as JSON writes it where it can, at most 40 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}")
