"""``<model>``: the KServe ``infer`` face of a model (not decoupled, holds no weights).

Each request is sent on to ``<model>_stream``, where the weights live and the in-flight
batching happens, over tritonserver's own gRPC port (``vlm_triton.forward``: no BLS), asking
for the whole answer in one response. ``execute`` returns at once; each request is answered
through its own response sender as soon as its answer is in (default-mode models may use it
since Triton 24.06), so a short request never waits for a long one that arrived in the same
batch. A client that leaves is noticed and its row in the scheduler cancelled.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing

import numpy as np
import triton_python_backend_utils as pb_utils

from vlm_engine.errors import Cancelled, EngineError, InvalidParameter, InvalidRequest, from_message
from vlm_engine.kserve import asks_several, face_outputs, one_string
from vlm_triton.forward import Forwarder
from vlm_triton.sender import FINAL, Sender
from vlm_triton.tensors import model_parameters, triton_error

FORWARDED = ("prompt", "image", "messages", "max_tokens", "temperature", "top_p", "sampling_parameters")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.target = model_parameters(args)["stream_model"]
        self.outputs = [o["name"] for o in config["output"]]
        self.forwarder = Forwarder()

    @staticmethod
    def _arrays(request) -> dict[str, np.ndarray]:
        """Copies of the request's tensors (its own are freed when ``execute`` returns)."""
        arrays = {}
        for name in FORWARDED:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = np.array(tensor.as_numpy(), copy=True)
        arrays["stream"] = np.array([[False]], dtype=np.bool_)
        return arrays

    async def _answer(self, arrays: dict[str, np.ndarray], sender: Sender) -> None:
        try:
            text, entities, final, logprobs = [], None, False, None
            pieces = self.forwarder.pieces(self.target, arrays, self.outputs, sender.is_cancelled)
            async with aclosing(pieces):
                async for piece in pieces:
                    if piece.error is not None:
                        error = triton_error(from_message(piece.error))
                        sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                        return
                    text.append(piece.text)
                    entities = piece.entities if piece.entities is not None else entities
                    if piece.logprobs is not None:
                        logprobs = (logprobs or []) + piece.logprobs
                    final = piece.final
            if not final:
                raise EngineError(f"{self.target} ended the answer without its final response")
            arrays = face_outputs("".join(text), entities, logprobs, "entities" in self.outputs)
            tensors = [pb_utils.Tensor(name, array) for name, array in arrays]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
        except asyncio.CancelledError:
            error = triton_error(Cancelled("the client cancelled the request"))
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)

    def execute(self, requests):
        for request in requests:
            sender = Sender(request.get_response_sender())
            arrays = self._arrays(request)
            if asks_several(_sampling_text(arrays)):
                error = InvalidParameter(f"{self.target[: -len('_stream')]} answers once: send n > 1 to {self.target}")
                sender.send(pb_utils.InferenceResponse(error=triton_error(error)), flags=FINAL)
                continue
            self.forwarder.run(self._answer(arrays, sender))
        return None

    def finalize(self) -> None:
        self.forwarder.close()


def _sampling_text(arrays: dict[str, np.ndarray]) -> str | None:
    try:
        return one_string("sampling_parameters", arrays.get("sampling_parameters"))
    except InvalidRequest:
        return None  # the stream model says what is wrong with it
