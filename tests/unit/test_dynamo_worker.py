"""vlm_dynamo's conversions between Dynamo's tensor protocol and tritonclient, and its error
marking, without a runtime (the integration tests run them through Dynamo's frontend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from vlm_dynamo.tensors import (
    TensorError,
    from_dynamo_parameters,
    to_dynamo,
    to_dynamo_parameters,
    to_infer_inputs,
    to_numpy,
)
from vlm_dynamo.worker import endpoint_name, is_clients_fault


def tensor(name: str, data_type: str, shape: list[int], values: list) -> dict:
    return {"metadata": {"name": name, "data_type": data_type, "shape": shape}, "data": {"values": values}}


def test_inputs_keep_their_names_types_shapes_and_values():
    image = bytes(range(7))
    prompt, picture, tokens = to_infer_inputs(
        [
            tensor("prompt", "Bytes", [1, 1], [list(b"What is this?")]),
            tensor("image", "Uint8", [1, 7], list(image)),
            tensor("max_tokens", "Int32", [1, 1], [12]),
        ]
    )
    assert (prompt.name(), prompt.datatype(), prompt.shape()) == ("prompt", "BYTES", [1, 1])
    assert (picture.name(), picture.datatype(), picture.shape()) == ("image", "UINT8", [1, 7])
    assert (tokens.name(), tokens.datatype(), tokens.shape()) == ("max_tokens", "INT32", [1, 1])
    assert to_numpy(tensor("image", "Uint8", [1, 7], list(image))).tobytes() == image
    assert to_numpy(tensor("prompt", "Bytes", [1, 1], [list(b"hi")]))[0, 0] == b"hi"


def test_outputs_come_back_in_dynamos_form():
    text = to_dynamo("generated_text", "BYTES", np.array([[b"a dog"]], dtype=np.object_))
    assert text == {
        "metadata": {"name": "generated_text", "data_type": "Bytes", "shape": [1, 1]},
        "data": {"data_type": "Bytes", "values": [list(b"a dog")]},
    }
    counts = to_dynamo("n", "INT32", np.array([[3, 4]], dtype=np.int32))
    assert counts["data"]["values"] == [3, 4] and counts["metadata"]["data_type"] == "Int32"


@pytest.mark.parametrize(
    "bad",
    [
        tensor("image", "Uint8", [1, 8], list(range(7))),  # values do not fill the shape
        tensor("image", "Complex", [1], [1]),  # no such datatype
        {"metadata": {"name": "prompt"}},  # no contents
    ],
)
def test_a_malformed_tensor_is_the_clients_error_and_names_the_input(bad):
    with pytest.raises(TensorError, match=repr(bad["metadata"]["name"])):
        to_infer_inputs([bad])


def test_parameters_cross_both_ways():
    assert from_dynamo_parameters({"max_tokens": {"int64": 8}, "stream": {"bool": True}}) == {
        "max_tokens": 8,
        "stream": True,
    }
    assert from_dynamo_parameters(None) == {}
    response = service_pb2.ModelInferResponse()
    response.parameters["triton_final_response"].bool_param = True
    response.parameters["note"].string_param = "x"
    assert to_dynamo_parameters(response.parameters) == {
        "triton_final_response": {"bool": True},
        "note": {"string": "x"},
    }


def test_the_clients_own_mistakes_are_told_apart_from_server_faults():
    assert is_clients_fault(InferenceServerException("bad image", status="StatusCode.INVALID_ARGUMENT"))
    # in a stream Triton sends no status: the engine's error code at the start of the message says it
    assert is_clients_fault(InferenceServerException("invalid_image: image bytes are not a recognised image"))
    assert is_clients_fault(InferenceServerException("prompt_too_long: 900 tokens, at most 512"))
    assert not is_clients_fault(InferenceServerException("Stub process 'llava_0' is not healthy."))
    assert not is_clients_fault(InferenceServerException("connection reset", status="StatusCode.UNAVAILABLE"))


def test_endpoint_names_are_safe_and_none_is_a_prefix_of_another():
    names = [endpoint_name(m) for m in ("llava", "llava_stream", "qwen3-vl", "Qwen3-VL")]
    assert all(n.replace("_", "").replace("-", "").isalnum() and n == n.lower() for n in names)
    assert len(set(names)) == 4
    assert not any(a != b and b.startswith(a) for a in names for b in names)


def test_dynamos_own_pytest_plugins_are_off(pytestconfig):
    """ai-dynamo's pytest plugins load into every run; one skips files named test_triton_*."""
    for name in ("triton_tests", "sglang_tests", "trtllm_tests", "vllm_tests"):
        assert not pytestconfig.pluginmanager.has_plugin(name), name
    path = Path(__file__).resolve().parents[1] / "integration" / "test_triton_models.py"
    assert not pytestconfig.hook.pytest_ignore_collect(collection_path=path, config=pytestconfig)
