"""``VLMClient``: the four models over KServe v2 (HTTP or gRPC) with the official tritonclient."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Answer:
    text: str
    seconds: float
    entities: list[dict] | None = None  # Kosmos-2's grounded phrases, moondream2's detections


GROUNDING = ("kosmos2", "moondream2")  # their faces answer entities too


class VLMClient:
    """``VLMClient("http://127.0.0.1:8000")`` or ``VLMClient("grpc://127.0.0.1:8001")``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout_s: float = 300.0):
        scheme, _, address = url.partition("://")
        if not address:
            scheme, address = "http", url
        if scheme not in ("http", "grpc"):
            raise ValueError(f"url must start with http:// or grpc://, got {url!r}")
        self.protocol, self.address, self.timeout_s = scheme, address, timeout_s
        if scheme == "http":
            import tritonclient.http as module

            self._client = module.InferenceServerClient(address, network_timeout=timeout_s)
        else:
            import tritonclient.grpc as module

            self._client = module.InferenceServerClient(address)
        self._module = module
        self.last_entities: list[dict] | None = None

    def _inputs(self, image: bytes | str | Path | None, prompt: str, max_tokens, temperature, top_p) -> list:
        if isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        tensors = []

        def add(name, array, dtype):
            tensor = self._module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)

        add("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES")
        if image is not None:
            add("image", np.frombuffer(image, dtype=np.uint8).reshape(1, -1), "UINT8")
        if max_tokens is not None:
            add("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if value is not None:
                add(name, np.array([[value]], dtype=np.float32), "FP32")
        return tensors

    def infer(self, model: str, image, prompt: str, max_tokens=None, temperature=None, top_p=None) -> str:
        """The whole answer (KServe ``infer`` on ``model``; without an image, on ``<model>_stream``,
        whose image is optional: the ``<model>`` face takes a prompt and an image)."""
        return self._answer(model, image, prompt, max_tokens, temperature, top_p)[0]

    def chat(self, model: str, image, prompt: str, **params) -> Answer:
        """The answer, the seconds it took, and the entities of the models that ground."""
        start = time.perf_counter()
        text, entities = self._answer(model, image, prompt, **params)
        return Answer(text, time.perf_counter() - start, entities)

    def _answer(self, model: str, image, prompt: str, max_tokens=None, temperature=None, top_p=None):
        if image is None:
            chunks = self._stream_grpc_or_http(model, None, prompt, max_tokens, temperature, top_p)
            return "".join(chunks), (self.last_entities if model in GROUNDING else None)
        result = self._client.infer(model, self._inputs(image, prompt, max_tokens, temperature, top_p))
        text = result.as_numpy("generated_text").reshape(-1)[0].decode()
        entities = result.as_numpy("entities") if model in GROUNDING else None
        return text, (json.loads(entities.reshape(-1)[0]) if entities is not None else None)

    def stream(self, model: str, image, prompt: str, max_tokens=None, temperature=None, top_p=None) -> Iterator[str]:
        """Text chunks as they are generated (``<model>_stream``); afterwards ``last_entities``
        holds the entities of the models that ground."""
        return self._stream_grpc_or_http(model, image, prompt, max_tokens, temperature, top_p)

    def _stream_grpc_or_http(self, model, image, prompt, max_tokens, temperature, top_p) -> Iterator[str]:
        self.last_entities = None
        if self.protocol == "grpc":
            yield from self._stream_grpc(model, self._inputs(image, prompt, max_tokens, temperature, top_p))
            return
        import requests

        if isinstance(image, (str, Path)):
            image = Path(image).read_bytes()
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        body = {k: v for k, v in body.items() if v is not None}
        if image is not None:
            body["image"] = list(image)
        url = f"http://{self.address}/v2/models/{model}_stream/generate_stream"
        with requests.post(url, json=body, stream=True, timeout=self.timeout_s) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
            for line in reply.iter_lines():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    if isinstance(event.get("entities"), str):
                        self.last_entities = json.loads(event["entities"])
                    if event.get("generated_text"):
                        yield event["generated_text"]

    def _stream_grpc(self, model: str, tensors) -> Iterator[str]:
        results: queue.Queue = queue.Queue()
        self._client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            self._client.async_stream_infer(f"{model}_stream", tensors, enable_empty_final_response=True)
            while True:
                result, error = results.get(timeout=self.timeout_s)
                if error is not None:
                    raise RuntimeError(error.message())
                response = result.get_response()
                if any(o.name == "entities" for o in response.outputs):
                    self.last_entities = json.loads(result.as_numpy("entities").reshape(-1)[0])
                if any(o.name == "generated_text" for o in response.outputs):
                    text = result.as_numpy("generated_text").reshape(-1)[0].decode()
                    if text:
                        yield text
                if response.parameters["triton_final_response"].bool_param:
                    return
        finally:
            self._client.stop_stream()
