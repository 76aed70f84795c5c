"""``<model>_stream``: the decoupled model that holds the weights and streams answers.

One instance per device loads the engine, whose scheduler batches in flight. ``execute``
validates each request (a bad one gets its own error at once), hands the valid ones to the
scheduler and returns without waiting, as Triton's vLLM backend does. Responses are built
and sent by a sender thread, so the step loop never waits on Triton's IPC.
"""

from __future__ import annotations

import json
import queue
import threading

import triton_python_backend_utils as pb_utils

from vlm_engine.chat import parse_openai_messages, single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import InvalidRequest
from vlm_engine.scheduler import Event
from vlm_triton.metrics import TritonMetrics
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


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = model_parameters(args)
        name = parameters.pop("model")
        self.engine = VLMEngine.from_config(name, parameters, metrics=TritonMetrics(name))
        self.with_entities = self.engine.adapter.grounding
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sender_thread = threading.Thread(target=self._send_loop, name="responses", daemon=True)
        self.sender_thread.start()
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.engine.name} loaded from {self.engine.settings.model_path} "
            f"on {self.engine.device} in {self.engine.load_seconds:.1f}s; scheduler "
            f"{self.engine.settings.scheduler}, up to {self.engine.settings.max_running} rows"
        )

    def _prepare(self, request, sender):
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
            cancelled=sender.is_cancelled,
        )

    def _responder(self, sender, streaming: bool):
        """The scheduler's callback for one request: hand its events to the sender thread."""

        def emit(event: Event) -> None:
            if event.final or (streaming and event.text):
                self.outbox.put((sender, streaming, event))

        return emit

    def _send_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            sender, streaming, event = item
            try:
                self._send(sender, streaming, event)
            except Exception as exc:  # the client is gone, or Triton refused the response
                pb_utils.Logger.log_warn(f"response not sent: {exc}")

    def _send(self, sender, streaming: bool, event: Event) -> None:
        if event.error is not None:
            sender.send(pb_utils.InferenceResponse(error=triton_error(event.error)), flags=FINAL)
            return
        if event.result is None:
            sender.send(pb_utils.InferenceResponse(output_tensors=[text_tensor("generated_text", event.text)]))
            return
        result = event.result
        outputs = [
            text_tensor("generated_text", event.text if streaming else result.text),
            int_tensor("prompt_tokens", result.prompt_tokens),
            int_tensor("output_tokens", result.output_tokens),
            text_tensor("finish_reason", result.finish_reason),
        ]
        if self.with_entities:
            outputs.append(json_tensor("entities", result.entities or []))
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prepared = self._prepare(request, sender)
                streaming = scalar_input(request, "stream", bool) is not False
                self.engine.submit(prepared, self._responder(sender, streaming))
            except Exception as exc:  # this request alone fails, at once
                self.outbox.put((sender, False, Event(error=exc)))
        return None

    def finalize(self) -> None:
        """Unloading: finish what is running (bounded), refuse the rest, stop the loop."""
        if self.engine is not None:
            self.engine.close(drain=True)
            self.engine = None
        self.outbox.put(None)  # after the last event: the sender thread sends it, then stops
        self.sender_thread.join(timeout=10)
