"""Forwarding a request to a ``<model>_stream`` model with BLS and reading its stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

FORWARDED = ("prompt", "image", "messages", "max_tokens", "temperature", "top_p")


@dataclass
class StreamPiece:
    text: str = ""
    entities: list | None = None
    error: pb_utils.TritonError | None = None


def stream_from(model: str, inputs: list[pb_utils.Tensor], outputs: list[str]) -> Iterator[StreamPiece]:
    """Send one request to a decoupled model and read its responses as ``StreamPiece``s.

    Blocking: call it from a worker thread (synchronous BLS from worker threads works in
    Triton 2.51; iterating an ``async_exec`` iterator from one crashed the stub), so that
    ``execute`` can return at once and each request is answered when its own answer is done.
    """
    request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
    return read_pieces(request.exec(decoupled=True))


def read_pieces(responses) -> Iterator[StreamPiece]:
    for response in responses:  # in this Triton release the iterator is a plain one
        if response.has_error():
            yield StreamPiece(error=response.error())
            return
        piece = StreamPiece()
        text = pb_utils.get_output_tensor_by_name(response, "generated_text")
        if text is not None:
            piece.text = text.as_numpy().reshape(-1)[0].decode("utf-8")
        entities = pb_utils.get_output_tensor_by_name(response, "entities")
        if entities is not None:
            piece.entities = json.loads(entities.as_numpy().reshape(-1)[0])
        yield piece


def one_string(value: str, batched: bool) -> np.ndarray:
    array = np.array([value.encode("utf-8")], dtype=np.object_)
    return array.reshape(1, 1) if batched else array
