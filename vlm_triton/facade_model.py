"""``<model>``: the KServe ``infer`` face of a model (not decoupled, holds no weights).

Each request is forwarded with BLS to ``<model>_stream``, where the weights live and the
in-flight batching happens, asking for the whole answer in one response. ``execute``
returns at once: worker threads wait for the answers and each request is answered through
its own response sender (default-mode models may use it since Triton 24.06), so a short
request never waits for a long one that arrived in the same batch.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.errors import from_message
from vlm_triton.bls import FORWARDED, stream_from
from vlm_triton.tensors import json_tensor, model_parameters, text_tensor, triton_error

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = model_parameters(args)
        self.target = parameters["stream_model"]
        self.outputs = [o["name"] for o in config["output"]]
        self.pool = ThreadPoolExecutor(int(parameters.get("forwarders", "64")), thread_name_prefix="forward")

    def _inputs(self, request) -> list[pb_utils.Tensor]:
        """Copies of the request's tensors (its own are freed when ``execute`` returns)."""
        tensors = []
        for name in FORWARDED:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors.append(pb_utils.Tensor(name, np.array(tensor.as_numpy(), copy=True)))
        tensors.append(pb_utils.Tensor("stream", np.array([[False]], dtype=np.bool_)))
        return tensors

    def _forward(self, inputs: list[pb_utils.Tensor], sender) -> None:
        try:
            text, entities = [], None
            for piece in stream_from(self.target, inputs, self.outputs):
                if piece.error is not None:  # BLS drops the code; the message still carries it
                    error = triton_error(from_message(piece.error.message()))
                    sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                    return
                text.append(piece.text)
                entities = piece.entities if piece.entities is not None else entities
            tensors = [text_tensor("generated_text", "".join(text))]
            if "entities" in self.outputs:
                tensors.append(json_tensor("entities", entities or []))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._forward, self._inputs(request), request.get_response_sender())
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
