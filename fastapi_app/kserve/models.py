"""The KServe models the service answers without Triton: for each served model, its face
(``<model>``, one answer per request) and ``<model>_stream`` (decoupled), each described by the
same ``triton_models/<name>/config.pbtxt`` that Triton reads."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from fastapi_app.kserve.codec import Tensor
from vlm_engine.errors import InvalidRequest

REPOSITORY = Path(__file__).resolve().parents[2] / "triton_models"


@dataclass(frozen=True)
class KServeModel:
    name: str
    base: str  # the engine's model
    decoupled: bool
    config: dict  # Triton's JSON form of config.pbtxt

    def metadata(self) -> dict:
        batch = [-1] if self.config.get("max_batch_size", 0) > 0 else []

        def describe(tensor: dict) -> dict:
            dims = [int(d) for d in tensor.get("dims", [])]
            return {"name": tensor["name"], "datatype": _kserve_type(tensor["data_type"]), "shape": batch + dims}

        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "python",
            "inputs": [describe(t) for t in self.config.get("input", [])],
            "outputs": [describe(t) for t in self.config.get("output", [])],
        }

    def check(self, tensors: list[Tensor]) -> dict[str, np.ndarray]:
        """The inputs as Triton checks them against the config: known names, their datatypes,
        every required one present, their rank; then name -> array."""
        declared = {t["name"]: t for t in self.config.get("input", [])}
        arrays = {}
        for tensor in tensors:
            spec = declared.get(tensor.name)
            if spec is None:
                raise InvalidRequest(f"unexpected inference input '{tensor.name}' for model '{self.name}'")
            expected = _kserve_type(spec["data_type"])
            if tensor.datatype != expected:
                raise InvalidRequest(
                    f"input '{tensor.name}' data-type is '{tensor.datatype}', but model '{self.name}' "
                    f"expects '{expected}'"
                )
            rank = len(spec.get("dims", [])) + (1 if self.config.get("max_batch_size", 0) > 0 else 0)
            if len(tensor.shape) != rank:
                raise InvalidRequest(
                    f"input '{tensor.name}' has shape {tensor.shape}; model '{self.name}' expects {rank} dimensions"
                )
            arrays[tensor.name] = tensor.array
        missing = [n for n, spec in declared.items() if not spec.get("optional") and n not in arrays]
        if missing:
            raise InvalidRequest(f"model '{self.name}' expects input(s) {', '.join(missing)}; they are missing")
        return arrays


def _kserve_type(triton_type: str) -> str:
    kind = triton_type.removeprefix("TYPE_")
    return "BYTES" if kind == "STRING" else kind


@cache
def load_config(name: str) -> dict:
    text = (REPOSITORY / name / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    as_dict = json_format.MessageToDict(
        config, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
    )
    return _int_dims(as_dict)


def _int_dims(value):
    """Triton's JSON gives ``dims`` as numbers (protobuf's JSON, strings for int64)."""
    if isinstance(value, dict):
        return {k: [int(d) for d in v] if k == "dims" else _int_dims(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_dims(v) for v in value]
    return value


def served(models: list[str]) -> dict[str, KServeModel]:
    """Each served model's face and stream model, by the names Triton gives them."""
    out = {}
    for base in models:
        for name in (base, f"{base}_stream"):
            config = load_config(name)
            decoupled = bool(config.get("model_transaction_policy", {}).get("decoupled", False))
            out[name] = KServeModel(name, base, decoupled, config)
    return out
