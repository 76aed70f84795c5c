"""``<model>_stream``: the decoupled model that holds the weights and streams answers.

One instance per device loads the engine, whose scheduler batches in flight: the native
engine, or with ``ENGINE=vllm`` (llava, qwen3-vl) vLLM's behind the same verbs
(``vlm_engine.vllm_engine``), in vLLM's own environment. ``execute``
validates each request (a bad one gets its own error at once), hands the valid ones to the
scheduler and returns without waiting, as Triton's vLLM backend does. Responses are built
and sent by a sender thread, so the step loop never waits on Triton's IPC.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils

from vlm_engine.engine import VLMEngine
from vlm_engine.errors import ModelConfigError
from vlm_engine.kserve import HEARTBEAT, prepare, read_inputs, stream_outputs
from vlm_engine.scheduler import Event
from vlm_engine.settings import ModelSettings, resolve_settings
from vlm_triton.metrics import TritonMetrics
from vlm_triton.outbox import Outbox
from vlm_triton.placement import instance_device
from vlm_triton.sender import FINAL, Sender
from vlm_triton.tensors import (
    batch_size,
    model_parameters,
    triton_error,
)


def engine_class(settings: ModelSettings) -> type:
    """The native engine, or vLLM's (``ENGINE=vllm``: this stub runs in vLLM's environment)."""
    if settings.engine == "native":
        return VLMEngine
    try:
        from vlm_engine.vllm_engine import VllmEngine
    except ImportError as exc:
        raise ModelConfigError(
            f"{settings.name}: ENGINE=vllm, but vLLM does not import in this model's environment ({exc}): start "
            "tritonserver through vlm_triton.launch or vlm_triton.serve, which point the model at vLLM's "
            "environment (EXECUTION_ENV_PATH), after `make vllm-env`"
        ) from None
    return VllmEngine


def asks_heartbeat(request) -> bool:
    """Whether the request's parameters ask for heartbeats (``vlm_engine.kserve.HEARTBEAT``: the
    forwarder of the KServe face and ``llm_decoupled`` sets it)."""
    try:
        return bool(json.loads(request.parameters() or "{}").get(HEARTBEAT))
    except (AttributeError, ValueError):
        return False


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = model_parameters(args)
        name = parameters.pop("model")
        parameters.update(instance_device(args))
        settings = resolve_settings(name, parameters)
        self.engine = engine_class(settings)(settings, metrics=TritonMetrics(name), on_fatal=self._fatal)
        self.with_entities = self.engine.adapter.grounding
        self.outbox = Outbox()
        self.preparing = ThreadPoolExecutor(int(parameters.get("preparing_threads", "4")), thread_name_prefix="prepare")
        self.sender_thread = threading.Thread(target=self._send_loop, name="responses", daemon=True)
        self.sender_thread.start()
        scheduler = "vLLM's" if settings.engine == "vllm" else settings.scheduler
        pb_utils.Logger.log_info(
            f"{args['model_name']}: {self.engine.name} ({settings.engine} engine) loaded from "
            f"{settings.model_path} on {self.engine.device} in {self.engine.load_seconds:.1f}s; scheduler "
            f"{scheduler}, up to {settings.max_running} rows"
        )

    @staticmethod
    def _fatal(exc: BaseException) -> None:
        """A CUDA error other than out-of-memory leaves this process's device context broken:
        exit, so that the watchdog (vlm_triton.serve) sees the stub die and reloads the model."""
        pb_utils.Logger.log_error(f"fatal device error, the model's process exits to be reloaded: {exc}")
        os._exit(70)

    @staticmethod
    def _read(request) -> dict:
        """The request's inputs as plain values (cheap: no image is decoded here)."""
        batch_size(request)
        values = read_inputs({t.name(): t.as_numpy() for t in request.inputs()})
        values["heartbeat"] = asks_heartbeat(request)
        return values

    def _prepare(self, values: dict, sender):
        return prepare(self.engine, values, sender.is_cancelled, reserved=True)

    def _admit(self, values: dict, sender) -> None:
        """On a preparing thread: decode and check the request, then queue it in its reserved place."""
        try:
            prepared = self._prepare(values, sender)
        except Exception as exc:  # this request alone fails
            self.engine.unreserve()
            self.outbox.put((sender, False, Event(error=exc)))
            return
        sender.answers = 1 + len(prepared.siblings)  # the request's final response comes with the last
        for answer in (prepared, *prepared.siblings):
            answer.streamed = values["streaming"]  # else its text events are only heartbeats
        try:
            emit = self._responder(sender, values["streaming"], values["heartbeat"])
            self.engine.submit(prepared, emit, reserved=True)
        except Exception as exc:
            self.outbox.put((sender, False, Event(error=exc)))

    def _responder(self, sender, streaming: bool, heartbeat: bool = False):
        """The scheduler's callback for one request: hand its events to the sender thread. A
        request not streamed that asked for heartbeats (the KServe face's forwarder) gets an
        empty response where a streamed one would get text: it checks its client on each."""

        def emit(event: Event) -> None:
            if event.final or (streaming and event.text):
                self.outbox.put((sender, streaming, event))
            elif heartbeat and event.text:
                self.outbox.put((sender, False, Event(index=event.index)))

        return emit

    def _send_loop(self) -> None:
        self.outbox.drain(self._send_safely)

    def _send_safely(self, item) -> None:
        sender, streaming, event = item
        try:
            self._send(sender, streaming, event)
        except Exception as exc:  # the client is gone, or Triton refused the response
            pb_utils.Logger.log_warn(f"response not sent: {exc}")

    def _send(self, sender, streaming: bool, event: Event) -> None:
        if event.error is not None:
            sender.send(pb_utils.InferenceResponse(error=triton_error(event.error)), flags=FINAL)
            return
        outputs = [
            pb_utils.Tensor(name, array)
            for name, array in stream_outputs(event, streaming, sender.answers > 1, self.with_entities)
        ]
        if event.result is None:
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
            return
        sender.finals += 1
        sender.send(
            pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if sender.finals >= sender.answers else 0
        )

    def execute(self, requests):
        """Refuses at once what the queue cannot take; the rest is decoded and checked on the
        preparing threads (images are the costly part), never here: a burst is refused fast."""
        for request in requests:
            sender = Sender(request.get_response_sender())
            try:
                values = self._read(request)
                self.engine.reserve()
            except Exception as exc:  # this request alone fails, at once
                self.outbox.put((sender, False, Event(error=exc)))
                continue
            self.preparing.submit(self._admit, values, sender)
        return None

    def finalize(self) -> None:
        """Unloading: finish what is running (bounded), refuse the rest, stop the loop."""
        self.preparing.shutdown(wait=True)
        if self.engine is not None:
            self.engine.close(drain=True)
            self.engine = None
        self.outbox.close()  # after the last event: the sender thread sends it, then stops
        self.sender_thread.join(timeout=10)
