"""Reading request tensors, building responses, mapping engine errors to Triton codes."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.errors import Cancelled, EngineError, InvalidRequest, Overloaded


def optional_input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


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


def string_input(request, name: str) -> str | None:
    array = optional_input(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one string, got {array.size} elements")
    value = array.reshape(-1)[0]
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise InvalidRequest(f"input {name!r} is not valid UTF-8") from None


def scalar_input(request, name: str, kind: type) -> Any:
    array = optional_input(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequest(f"input {name!r} must hold one value, got {array.size}")
    return kind(array.reshape(-1)[0])


def bytes_input(request, name: str) -> bytes | None:
    array = optional_input(request, name)
    return None if array is None else array.reshape(-1).astype(np.uint8).tobytes()


def text_tensor(name: str, text: str, batched: bool = True) -> pb_utils.Tensor:
    array = np.array([text.encode("utf-8")], dtype=np.object_)
    return pb_utils.Tensor(name, array.reshape(1, 1) if batched else array)


def int_tensor(name: str, value: int) -> pb_utils.Tensor:
    return pb_utils.Tensor(name, np.array([[value]], dtype=np.int32))


def json_tensor(name: str, value: Any, batched: bool = True) -> pb_utils.Tensor:
    return text_tensor(name, json.dumps(value), batched)


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
    else:
        message = f"{EngineError.code}: {type(exc).__name__}: {exc}"
    return pb_utils.TritonError(message, code)


def model_parameters(args: dict) -> dict[str, str]:
    """``parameters`` of config.pbtxt as a plain dict."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
