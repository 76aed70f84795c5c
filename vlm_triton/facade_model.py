"""``<model>``: the KServe ``infer`` face of a model (not decoupled, holds no weights).

Each request is forwarded with BLS to ``<model>_stream``, where the weights live and the
batching happens, and its streamed pieces are joined into one response.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.errors import from_message
from vlm_triton.bls import forward_inputs, stream_from
from vlm_triton.tensors import json_tensor, model_parameters, text_tensor, triton_error


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.target = model_parameters(args)["stream_model"]
        self.outputs = [o["name"] for o in config["output"]]

    async def _one(self, request) -> pb_utils.InferenceResponse:
        # One response with the whole answer: no per-token messages between the two models.
        whole = pb_utils.Tensor("stream", np.array([[False]], dtype=np.bool_))
        pieces = await stream_from(self.target, [*forward_inputs(request), whole], self.outputs)
        text, entities = [], None
        for piece in pieces:
            if piece.error is not None:  # BLS drops the code; the message still carries it
                return pb_utils.InferenceResponse(error=triton_error(from_message(piece.error.message())))
            text.append(piece.text)
            entities = piece.entities if piece.entities is not None else entities
        tensors = [text_tensor("generated_text", "".join(text))]
        if "entities" in self.outputs:
            tensors.append(json_tensor("entities", entities or []))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    async def execute(self, requests):
        return list(await asyncio.gather(*(self._one(r) for r in requests)))
