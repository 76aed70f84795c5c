"""Tensors between Dynamo's tensor protocol and Triton's KServe gRPC client.

Dynamo's KServe frontend hands a worker ``{"model", "id", "tensors": [...], "parameters"}``;
each tensor is ``{"metadata": {"name", "data_type", "shape"}, "data": {"data_type", "values"}}``
with data types spelt ``Uint8``, ``Bytes``, ``Float32``..., values flattened, and each
``Bytes`` element a list of byte values. A worker answers with ``{"model", "id", "tensors"}``
in the same form. These functions convert both ways without touching the values' meaning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.utils import triton_to_np_dtype

TRITON_TO_DYNAMO = {
    "BOOL": "Bool",
    "UINT8": "Uint8",
    "UINT16": "Uint16",
    "UINT32": "Uint32",
    "UINT64": "Uint64",
    "INT8": "Int8",
    "INT16": "Int16",
    "INT32": "Int32",
    "INT64": "Int64",
    "FP16": "Float16",
    "BF16": "BFloat16",
    "FP32": "Float32",
    "FP64": "Float64",
    "BYTES": "Bytes",
}
DYNAMO_TO_TRITON = {dynamo: triton for triton, dynamo in TRITON_TO_DYNAMO.items()}


class TensorError(ValueError):
    """A request tensor that cannot be sent to Triton as it is (the client can fix it)."""


def to_numpy(tensor: dict[str, Any]) -> np.ndarray:
    """One Dynamo tensor as the NumPy array Triton's client sends."""
    metadata = tensor.get("metadata") or {}
    name, data_type, shape = metadata.get("name"), metadata.get("data_type"), metadata.get("shape")
    values = (tensor.get("data") or {}).get("values")
    if not name or data_type not in DYNAMO_TO_TRITON or shape is None or values is None:
        raise TensorError(f"input {name!r}: a tensor needs a name, a KServe datatype, a shape and contents")
    try:
        if data_type == "Bytes":
            items = [bytes(item) if not isinstance(item, (bytes, str)) else item for item in values]
            return np.array(items, dtype=np.object_).reshape(shape)
        dtype = triton_to_np_dtype(DYNAMO_TO_TRITON[data_type])
        if data_type in ("Float16", "BFloat16"):  # sent as their 16-bit patterns
            return np.asarray(values, dtype=np.uint16).view(dtype).reshape(shape)
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (ValueError, TypeError) as exc:
        raise TensorError(f"input {name!r}: {len(values)} values do not fill the shape {shape}: {exc}") from None


def to_infer_inputs(tensors: list[dict[str, Any]]) -> list[InferInput]:
    """The request's tensors as ``tritonclient.grpc`` inputs."""
    inputs = []
    for tensor in tensors:
        array = to_numpy(tensor)
        metadata = tensor["metadata"]
        item = InferInput(metadata["name"], list(array.shape), DYNAMO_TO_TRITON[metadata["data_type"]])
        item.set_data_from_numpy(array)
        inputs.append(item)
    return inputs


def to_dynamo(name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    """One Triton output (``datatype`` as Triton spells it) as a Dynamo tensor."""
    data_type = TRITON_TO_DYNAMO[datatype]
    if data_type == "Bytes":
        values: list[Any] = [list(item if isinstance(item, bytes) else str(item).encode()) for item in array.ravel()]
    elif data_type in ("Float16", "BFloat16"):
        values = np.ascontiguousarray(array).view(np.uint16).ravel().tolist()
    else:
        values = array.ravel().tolist()
    return {
        "metadata": {"name": name, "data_type": data_type, "shape": list(array.shape)},
        "data": {"data_type": data_type, "values": values},
    }


def from_dynamo_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Dynamo's request parameters (``{"max_tokens": {"int64": 8}}``) as plain values."""
    return {key: next(iter(value.values())) for key, value in (parameters or {}).items() if value}


def to_dynamo_parameters(parameters: Any) -> dict[str, Any]:
    """Triton's response parameters (``InferParameter`` messages) in Dynamo's form."""
    converted = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            converted[key] = {PARAMETER_KINDS[kind]: getattr(parameter, kind)}
    return converted


PARAMETER_KINDS = {
    "bool_param": "bool",
    "int64_param": "int64",
    "string_param": "string",
    "double_param": "double",
    "uint64_param": "uint64",
}


def response(model: str, request_id: str, result: Any) -> dict[str, Any]:
    """A Triton ``InferResult`` as Dynamo's tensor response (outputs and parameters)."""
    answer = result.get_response()
    return {
        "model": model,
        "id": request_id,
        "tensors": [to_dynamo(o.name, o.datatype, result.as_numpy(o.name)) for o in answer.outputs],
        "parameters": to_dynamo_parameters(answer.parameters),
    }
