"""``llm_decoupled``: a chat protocol over Triton's generate / generate_stream.

Request: ``text_input`` = JSON list of OpenAI-style messages (string content, or ``text``
and ``image_url`` parts with ``data:`` URLs); request ``parameters``: ``model`` (one of the
four, default qwen3-vl), ``streaming`` (default true), ``max_tokens``, ``temperature``,
``top_p``, and ``seed``, ``stop``, ``frequency_penalty``, ``presence_penalty``,
``repetition_penalty``, ``guide`` and ``logit_bias`` (JSON objects as text), checked by the
stream model. Each ``text_output`` is a JSON string:
``{"type":"chunk","content":...}`` pieces
then ``{"type":"complete"}``; with ``streaming: false`` one
``{"type":"complete","content":<whole answer>}``; on failure ``{"type":"error","content":...}``.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.settings import MODELS
from vlm_triton.forward import Forwarder
from vlm_triton.sender import FINAL, Sender

DEFAULT_MODEL = "qwen3-vl"
SAMPLING = ("seed", "stop", "frequency_penalty", "presence_penalty", "repetition_penalty")
OBJECTS = {"guide": '{"choice": ["yes", "no"]}', "logit_bias": '{"50": -100}'}  # structured output; token biases
NUMERIC = {"max_tokens": (np.int32, int), "temperature": (np.float32, float), "top_p": (np.float32, float)}


class BadChat(ValueError):
    pass


def one_string(value: str, batched: bool) -> np.ndarray:
    array = np.array([value.encode("utf-8")], dtype=np.object_)
    return array.reshape(1, 1) if batched else array


def _message(kind: str, content: str | None = None) -> pb_utils.InferenceResponse:
    body = {"type": kind} if content is None else {"type": kind, "content": content}
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("text_output", one_string(json.dumps(body), False))]
    )


def _request_inputs(request) -> tuple[str, bool, dict[str, np.ndarray]]:
    text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
    try:
        messages = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadChat(f"text_input must be a JSON list of messages: {exc}") from None
    if not isinstance(messages, list) or not messages:
        raise BadChat("text_input must be a non-empty JSON list of {role, content} messages")
    params = json.loads(request.parameters() or "{}")
    model = params.get("model", DEFAULT_MODEL)
    if model not in MODELS:
        raise BadChat(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    streaming = params.get("streaming", True)
    if not isinstance(streaming, bool):
        raise BadChat("parameters.streaming must be true or false")
    arrays = {"messages": one_string(json.dumps(messages), True)}
    for name, (dtype, kind) in NUMERIC.items():
        if name in params:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise BadChat(f"parameters.{name} must be a {'integer' if kind is int else 'number'}, got {value!r}")
            arrays[name] = np.array([[value]], dtype=dtype)
    sampling = {k: params[k] for k in SAMPLING if k in params}
    # JSON objects as text (a request parameter is a string, number or boolean)
    for name, example in OBJECTS.items():
        if name in params:
            try:
                sampling[name] = json.loads(params[name]) if isinstance(params[name], str) else None
            except json.JSONDecodeError as exc:
                raise BadChat(f"parameters.{name} must be a JSON object as text: {exc}") from None
            if not isinstance(sampling[name], dict):
                raise BadChat(f'parameters.{name} must be a JSON object as text, e.g. "{example}"')
    if sampling:
        arrays["sampling_parameters"] = one_string(json.dumps(sampling), True)
    return model, streaming, arrays


async def _relay(forwarder: Forwarder, model: str, arrays: dict[str, np.ndarray], sender: Sender, streaming: bool):
    try:
        answer, final = [], False
        pieces = forwarder.pieces(f"{model}_stream", arrays, ["generated_text"], sender.is_cancelled)
        async with aclosing(pieces):
            async for piece in pieces:
                if piece.error is not None:
                    sender.send(_message("error", piece.error), flags=FINAL)
                    return
                if piece.text:
                    answer.append(piece.text)
                    if streaming:
                        sender.send(_message("chunk", piece.text))
                final = piece.final
        if not final:
            raise RuntimeError(f"{model}_stream ended the answer without its final response")
        sender.send(_message("complete", None if streaming else "".join(answer)), flags=FINAL)
    except asyncio.CancelledError:
        sender.send(_message("error", "cancelled: the client cancelled the request"), flags=FINAL)
    except Exception as exc:
        sender.send(_message("error", f"{type(exc).__name__}: {exc}"), flags=FINAL)


class TritonPythonModel:
    """``execute`` parses each request and returns; the forwarder relays the answers."""

    def initialize(self, args: dict) -> None:
        self.forwarder = Forwarder()

    def execute(self, requests):
        for request in requests:
            sender = Sender(request.get_response_sender())
            try:
                model, streaming, arrays = _request_inputs(request)
            except BadChat as exc:
                sender.send(_message("error", str(exc)), flags=FINAL)
                continue
            self.forwarder.run(_relay(self.forwarder, model, arrays, sender, streaming))
        return None

    def finalize(self) -> None:
        self.forwarder.close()
