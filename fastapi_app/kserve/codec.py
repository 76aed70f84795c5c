"""KServe v2 HTTP tensors: a request's inputs from JSON and Triton's binary tensor extension
(``Inference-Header-Content-Length``), and a response's outputs back the way the client asked
(JSON data, or binary with ``binary_data`` / ``binary_data_output``)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from vlm_engine.errors import InvalidRequest

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
HEADER = "Inference-Header-Content-Length"


class Tensor:
    """One input as sent: name, datatype, shape and its values."""

    def __init__(self, name: str, datatype: str, shape: list[int], array: np.ndarray):
        self.name, self.datatype, self.shape, self.array = name, datatype, shape, array


def decode_request(body: bytes, header_length: str | None) -> tuple[dict, list[Tensor]]:
    """The JSON header and the input tensors of an ``infer`` request body."""
    try:
        size = int(header_length) if header_length is not None else len(body)
        header = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not a KServe v2 JSON inference request: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidRequest("the request needs an 'inputs' list of tensors (name, shape, datatype, data)")
    outputs_asked(header)  # checked before the model runs
    binary, offset, tensors = body[size:], 0, []
    for item in header["inputs"]:
        name, datatype, shape = _tensor_fields(item)
        count = int(np.prod(shape)) if shape else 1
        binary_size = _object(item.get("parameters"), f"input {name!r}: 'parameters'").get("binary_data_size")
        if binary_size is not None:
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise InvalidRequest(f"input {name!r}: binary_data_size must be a byte count, got {binary_size!r}")
            chunk = binary[offset : offset + int(binary_size)]
            if len(chunk) != int(binary_size):
                raise InvalidRequest(f"input {name!r}: binary_data_size {binary_size} is past the end of the body")
            offset += int(binary_size)
            values = _from_binary(name, datatype, chunk)
        else:
            if "data" not in item:
                raise InvalidRequest(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            values = _from_json(name, datatype, item["data"])
        if values.size != count:
            raise InvalidRequest(f"input {name!r} has {values.size} elements, its shape {shape} needs {count}")
        tensors.append(Tensor(name, datatype, shape, values.reshape(shape)))
    return header, tensors


def outputs_asked(header: dict) -> tuple[dict[Any, dict], bool]:
    """The outputs the request names (name -> their parameters; empty: all of them), and
    whether it asks for every output in binary."""
    asked = header.get("outputs") or []
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise InvalidRequest('\'outputs\' must be a list of objects ({"name": ..., "parameters": {...}})')
    wanted = {o.get("name"): _object(o.get("parameters"), f"output {o.get('name')!r}: 'parameters'") for o in asked}
    return wanted, bool(_object(header.get("parameters"), "the request's 'parameters'").get("binary_data_output"))


def _object(value: Any, where: str) -> dict:
    """A JSON object the client may leave out (``parameters``): ``{}`` when absent."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _tensor_fields(item: Any) -> tuple[str, str, list[int]]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidRequest("every input needs a 'name', a 'shape' and a 'datatype'")
    name, datatype, shape = item["name"], item.get("datatype"), item.get("shape")
    if datatype not in DTYPES:
        raise InvalidRequest(f"input {name!r}: unknown datatype {datatype!r}; one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidRequest(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return name, datatype, shape


def _from_json(name: str, datatype: str, data: Any) -> np.ndarray:
    flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else np.array([data], dtype=object)
    try:
        if datatype == "BYTES":
            return np.array([v.encode() if isinstance(v, str) else bytes(v) for v in flat], dtype=np.object_)
        return np.array(flat.tolist(), dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"input {name!r}: its data is not {datatype}: {exc}") from None


def _from_binary(name: str, datatype: str, chunk: bytes) -> np.ndarray:
    if datatype != "BYTES":
        try:
            return np.frombuffer(chunk, dtype=DTYPES[datatype])
        except ValueError as exc:
            raise InvalidRequest(f"input {name!r}: {len(chunk)} bytes are not whole {datatype} values") from exc
    items, at = [], 0
    while at < len(chunk):  # each element: a 4-byte little-endian length, then the bytes
        if at + 4 > len(chunk):
            raise InvalidRequest(f"input {name!r}: a BYTES element's length is cut off")
        (length,) = struct.unpack_from("<I", chunk, at)
        items.append(chunk[at + 4 : at + 4 + length])
        at += 4 + length
    return np.array(items, dtype=np.object_)


def encode_response(model: str, header: dict, outputs: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, dict]:
    """The ``infer`` response body and headers; ``outputs`` maps name -> (datatype, array)."""
    wanted, all_binary = outputs_asked(header)
    entries, blobs = [], []
    for name, (datatype, array) in outputs.items():
        if wanted and name not in wanted:
            continue
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if wanted.get(name, {}).get("binary_data", all_binary):
            blob = _to_binary(datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_json_values(datatype, array)
        entries.append(entry)
    reply = {"model_name": model, "model_version": "1", "outputs": entries}
    if "id" in header:
        reply["id"] = header["id"]
    text = json.dumps(reply).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER: str(len(text))}


def to_json_values(datatype: str, array: np.ndarray) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def _to_binary(datatype: str, array: np.ndarray) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array).tobytes()
    parts = []
    for value in array.reshape(-1):
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)
