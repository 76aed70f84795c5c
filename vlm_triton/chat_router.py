"""``llm_decoupled``: a chat protocol over Triton's generate / generate_stream.

Request: ``text_input`` = JSON list of OpenAI-style messages (string content, or ``text``
and ``image_url`` parts with ``data:`` URLs); request ``parameters``: ``model`` (one of the
four, default qwen3-vl), ``streaming`` (default true), ``max_tokens``, ``temperature``,
``top_p``. Each ``text_output`` is a JSON string: ``{"type":"chunk","content":...}`` pieces
then ``{"type":"complete"}``; with ``streaming: false`` one
``{"type":"complete","content":<whole answer>}``; on failure ``{"type":"error","content":...}``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.settings import MODELS
from vlm_triton.bls import one_string, stream_from

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MODEL = "qwen3-vl"
NUMERIC = {"max_tokens": (np.int32, int), "temperature": (np.float32, float), "top_p": (np.float32, float)}


class BadChat(ValueError):
    pass


def _message(kind: str, content: str | None = None) -> pb_utils.InferenceResponse:
    body = {"type": kind} if content is None else {"type": kind, "content": content}
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("text_output", one_string(json.dumps(body), False))]
    )


def _request_inputs(request) -> tuple[str, bool, list[pb_utils.Tensor]]:
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
    inputs = [pb_utils.Tensor("messages", one_string(json.dumps(messages), True))]
    for name, (dtype, kind) in NUMERIC.items():
        if name in params:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise BadChat(f"parameters.{name} must be a {'integer' if kind is int else 'number'}, got {value!r}")
            inputs.append(pb_utils.Tensor(name, np.array([[value]], dtype=dtype)))
    return model, streaming, inputs


def _relay(pieces, sender, streaming: bool) -> None:
    answer = []
    for piece in pieces:
        if piece.error is not None:
            sender.send(_message("error", piece.error.message()), flags=FINAL)
            return
        if piece.text:
            answer.append(piece.text)
            if streaming:
                sender.send(_message("chunk", piece.text))
    if streaming:
        sender.send(_message("complete"), flags=FINAL)
    else:
        sender.send(_message("complete", "".join(answer)), flags=FINAL)


def _forward(model: str, inputs: list[pb_utils.Tensor], sender, streaming: bool) -> None:
    try:
        _relay(stream_from(f"{model}_stream", inputs, ["generated_text"]), sender, streaming)
    except Exception as exc:
        sender.send(_message("error", f"{type(exc).__name__}: {exc}"), flags=FINAL)


class TritonPythonModel:
    """``execute`` parses each request and returns; forwarder threads relay the answers."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        forwarders = config.get("parameters", {}).get("forwarders", {}).get("string_value") or "64"
        self.pool = ThreadPoolExecutor(int(forwarders), thread_name_prefix="forward")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                model, streaming, inputs = _request_inputs(request)
            except BadChat as exc:
                sender.send(_message("error", str(exc)), flags=FINAL)
                continue
            self.pool.submit(_forward, model, inputs, sender, streaming)
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)
