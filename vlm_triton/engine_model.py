"""``<model>_stream``: the decoupled model that holds the weights, batches and streams.

One instance per device loads the engine once. ``execute`` receives the dynamic batcher's
requests: each is validated alone (a bad one gets its own error and leaves the batch), the
valid ones are generated together, and every row's text is sent as it is produced.
"""

from __future__ import annotations

import json
import logging

import triton_python_backend_utils as pb_utils

from vlm_engine.chat import parse_openai_messages, single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import InvalidRequest
from vlm_triton.tensors import (
    batch_size,
    bytes_input,
    int_tensor,
    json_tensor,
    model_parameters,
    scalar_input,
    string_input,
    text_tensor,
    triton_error,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("vlm_triton")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = model_parameters(args)
        self.engine = VLMEngine.from_config(parameters.pop("model"), parameters)
        self.with_entities = self.engine.settings.architecture == "kosmos2"
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.engine.name} loaded from {self.engine.settings.model_path} "
            f"on {self.engine.device} in {self.engine.load_seconds:.1f}s"
        )

    def _prepare(self, request):
        batch_size(request)
        messages_json = string_input(request, "messages")
        if messages_json is not None:
            try:
                messages = parse_openai_messages(json.loads(messages_json))
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
        else:
            prompt = string_input(request, "prompt")
            if prompt is None:
                raise InvalidRequest("send a 'prompt' (with an 'image') or 'messages'")
            messages = single_turn(prompt, bytes_input(request, "image"))
        return self.engine.prepare(
            messages,
            max_tokens=scalar_input(request, "max_tokens", int),
            temperature=scalar_input(request, "temperature", float),
            top_p=scalar_input(request, "top_p", float),
            cancelled=request.is_cancelled,
        )

    def execute(self, requests):
        valid, senders, streaming = [], [], []
        for request in requests:
            sender = request.get_response_sender()
            try:
                valid.append(self._prepare(request))
                senders.append(sender)
                streaming.append(scalar_input(request, "stream", bool) is not False)
            except Exception as exc:  # this request alone fails
                sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)
        if not valid:
            return None
        finished = set()
        try:
            for chunk in self.engine.stream(valid):
                if chunk.result is None:
                    if streaming[chunk.index]:  # one response per chunk; else only the final one
                        outputs = [text_tensor("generated_text", chunk.text)]
                        senders[chunk.index].send(pb_utils.InferenceResponse(output_tensors=outputs))
                    continue
                result = chunk.result
                text = chunk.text if streaming[chunk.index] else result.text
                outputs = [
                    text_tensor("generated_text", text),
                    int_tensor("prompt_tokens", result.prompt_tokens),
                    int_tensor("output_tokens", result.output_tokens),
                    text_tensor("finish_reason", result.finish_reason),
                ]
                if self.with_entities:
                    outputs.append(json_tensor("entities", result.entities or []))
                senders[chunk.index].send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
                finished.add(chunk.index)
        except Exception as exc:
            log.exception("generation failed")
            for index, sender in enumerate(senders):
                if index not in finished:
                    sender.send(pb_utils.InferenceResponse(error=triton_error(exc)), flags=FINAL)
        return None

    def finalize(self) -> None:
        self.engine = None
