"""Reading request tensors, building responses, mapping engine errors to Triton codes."""

from __future__ import annotations

import json
import traceback

import triton_python_backend_utils as pb_utils

from vlm_engine.errors import Cancelled, EngineError, InvalidRequest, Overloaded


def batch_size(request) -> int:
    """Requests carry a batch dimension of 1; Triton does the batching."""
    for tensor in request.inputs():
        shape = tensor.shape()
        if shape and shape[0] != 1:
            raise InvalidRequest(
                f"input {tensor.name()!r} has batch size {shape[0]}; send one request per "
                "prompt and image (batch dimension 1): the server batches requests itself"
            )
    return 1


def triton_error(exc: BaseException) -> pb_utils.TritonError:
    """Engine errors keep their meaning: bad input -> INVALID_ARG (HTTP 400), and so on.

    The message starts with the engine's code (``invalid_image: ...``): BLS hands errors
    on as INTERNAL, and ``from_message`` restores the class on the other side.
    """
    codes = pb_utils.TritonError
    if isinstance(exc, InvalidRequest):
        code = codes.INVALID_ARG
    elif isinstance(exc, Overloaded):
        code = codes.UNAVAILABLE
    elif isinstance(exc, Cancelled):
        code = codes.CANCELLED
    else:
        code = codes.INTERNAL
    if isinstance(exc, EngineError):
        message = f"{exc.code}: {exc.message}"
    else:  # a bug of ours: the client gets one line, the log the whole traceback
        message = f"{EngineError.code}: {type(exc).__name__}: {exc}"
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        pb_utils.Logger.log_error(f"unexpected error answered as INTERNAL: {trace}")
    return pb_utils.TritonError(message, code)


def model_parameters(args: dict) -> dict[str, str]:
    """``parameters`` of config.pbtxt as a plain dict."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
