"""The KServe contract of the served models, one way for every server that answers it.

A request's tensors (``prompt`` + ``image``, or ``messages``; ``max_tokens``, ``temperature``,
``top_p``, ``stream``, ``sampling_parameters``) become one ``Prepared`` request. Triton's
``<model>_stream`` (``vlm_triton.engine_model``) and the service's own KServe face
(``fastapi_app.routes.kserve``, no tritonserver) both call ``read_inputs`` and ``prepare``, so
the same request gets the same answer from either; ``stream_outputs`` builds each response's
tensors for both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vlm_engine.chat import parse_openai_messages, single_turn
from vlm_engine.errors import InvalidRequest

TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls", "n")  # VLMEngine.prepare's own arguments

HEARTBEAT = "vlm_heartbeat"  # request parameter: the stream model sends an empty response where it would stream text


def one_string(name: str, array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one string, got {array.size} elements")
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} is not valid UTF-8") from None


def one_value(name: str, array: np.ndarray | None, kind: type) -> Any:
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold one value, got {array.size}")
    return kind(array.reshape(-1)[0])


def raw_bytes(array: np.ndarray | None) -> bytes | None:
    return None if array is None else array.reshape(-1).astype(np.uint8).tobytes()


def read_inputs(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The request's inputs as plain values (cheap: no image is decoded here)."""
    for name, array in arrays.items():
        if array.ndim and array.shape[0] != 1:
            raise InvalidRequest(
                f"input {name!r} has batch size {array.shape[0]}; send one request per "
                "prompt and image (batch dimension 1): the server batches requests itself"
            )
    return {
        "messages": one_string("messages", arrays.get("messages")),
        "prompt": one_string("prompt", arrays.get("prompt")),
        "image": raw_bytes(arrays.get("image")),
        "max_tokens": one_value("max_tokens", arrays.get("max_tokens"), int),
        "temperature": one_value("temperature", arrays.get("temperature"), float),
        "top_p": one_value("top_p", arrays.get("top_p"), float),
        "streaming": one_value("stream", arrays.get("stream"), bool) is not False,
        "sampling": one_string("sampling_parameters", arrays.get("sampling_parameters")),
    }


def sampling_parameters(text: str | None) -> dict | None:
    """The optional ``sampling_parameters`` input: a JSON object (seed, stop, penalties,
    logprobs, top_logprobs, guide, logit_bias with token ids as string keys; and ``TOOL_KEYS``),
    as Triton's vLLM backend takes its sampling parameters."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"sampling_parameters must be a JSON object, got {type(value).__name__}")
    return value


def asks_several(sampling_text: str | None) -> bool:
    """Whether ``sampling_parameters`` asks for n > 1 answers (the faces answer once; what
    else is wrong with it the engine says)."""
    try:
        options = sampling_parameters(sampling_text) or {}
    except InvalidRequest:
        return False
    return options.get("n", 1) != 1


def prepare(engine, values: Mapping[str, Any], cancelled: Callable[[], bool], reserved: bool = False):
    """``values`` (from ``read_inputs``) as the engine's ``Prepared`` request."""
    if values["messages"] is not None:
        try:
            messages = parse_openai_messages(json.loads(values["messages"]))
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
    else:
        if values["prompt"] is None:
            raise InvalidRequest("send a 'prompt' (with an 'image') or 'messages'")
        messages = single_turn(values["prompt"], values["image"])
    sampling = sampling_parameters(values["sampling"]) or {}
    tools = {k: sampling.pop(k) for k in TOOL_KEYS if k in sampling}  # they shape the prompt
    raw, count_only = sampling.pop("raw_prompt", False), sampling.pop("count_only", False)
    for name, value in (("raw_prompt", raw), ("count_only", count_only)):
        if not isinstance(value, bool):
            raise InvalidRequest(f"sampling_parameters.{name} must be true or false, got {value!r}")
    return engine.prepare(
        messages,
        max_tokens=values["max_tokens"],
        temperature=values["temperature"],
        top_p=values["top_p"],
        cancelled=cancelled,
        reserved=reserved,
        sampling=sampling or None,
        raw=raw,
        count_only=count_only,
        **tools,
    )


def text_array(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=np.object_)


def face_outputs(
    text: str, entities: list | None, logprobs: list | None, declares_entities: bool
) -> list[tuple[str, np.ndarray]]:
    """A ``<model>`` face's one response: ``generated_text``; ``entities`` where the model
    declares it (Kosmos-2, moondream2); ``logprobs`` when they were asked for."""
    outputs = [("generated_text", text_array(text))]
    if declares_entities:
        outputs.append(("entities", text_array(json.dumps(entities or []))))
    if logprobs is not None:
        outputs.append(("logprobs", text_array(json.dumps(logprobs))))
    return outputs


def stream_outputs(event, streaming: bool, several: bool, grounding: bool) -> list[tuple[str, np.ndarray]]:
    """A ``<model>_stream`` response's tensors for one scheduler event: text and its logprobs;
    on an answer's last, its accounting (and Kosmos-2's entities); ``index`` when n > 1. A
    request that is not ``streaming`` gets one response with the whole answer."""
    one = lambda value: np.array([[value]], dtype=np.int32)  # noqa: E731
    if event.result is None:
        outputs = [("generated_text", text_array(event.text))]
        if event.logprobs:
            outputs.append(("logprobs", text_array(json.dumps(event.logprobs))))
        if several:
            outputs.append(("index", one(event.index)))
        return outputs
    result = event.result
    outputs = [
        ("generated_text", text_array(event.text if streaming else result.text)),
        ("prompt_tokens", one(result.prompt_tokens)),
        ("output_tokens", one(result.output_tokens)),
        ("finish_reason", text_array(result.finish_reason)),
    ]
    if result.stop_sequence is not None:
        outputs.append(("stop_sequence", text_array(result.stop_sequence)))
    if result.logprobs is not None:
        logprobs = (event.logprobs or []) if streaming else result.logprobs
        outputs.append(("logprobs", text_array(json.dumps(logprobs or []))))
    if grounding:
        outputs.append(("entities", text_array(json.dumps(result.entities or []))))
    if several:
        outputs.append(("index", one(event.index)))
    return outputs
