"""Small wrappers over the official tritonclient for the four models' inputs."""

from __future__ import annotations

import json
import queue
import threading
import time
from functools import partial

import numpy as np
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]
GREEDY = {"temperature": 0.0}


def inputs(module, prompt: str | None, image: bytes | None, binary: bool = True, **params) -> list:
    """KServe v2 inputs with a batch dimension of 1 (the models batch requests themselves);
    ``binary=False``: HTTP inputs as JSON data instead of the binary tensor extension."""
    tensors = []

    def add(name, array, dtype):
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, **({} if binary else {"binary_data": False}))
        tensors.append(tensor)

    if prompt is not None:
        add("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES")
    if image is not None:
        add("image", np.frombuffer(image, dtype=np.uint8).reshape(1, -1), "UINT8")
    if "max_tokens" in params:
        add("max_tokens", np.array([[params["max_tokens"]]], dtype=np.int32), "INT32")
    for name in ("temperature", "top_p"):
        if name in params:
            add(name, np.array([[params[name]]], dtype=np.float32), "FP32")
    if "sampling" in params:
        add("sampling_parameters", np.array([[json.dumps(params["sampling"]).encode()]], dtype=np.object_), "BYTES")
    return tensors


def text_of(result) -> str:
    return result.as_numpy("generated_text").reshape(-1)[0].decode()


def infer_http(url: str, model: str, prompt, image, **params) -> str:
    client = httpclient.InferenceServerClient(url)
    return text_of(client.infer(model, inputs(httpclient, prompt, image, **params)))


def infer_grpc(url: str, model: str, prompt, image, **params) -> str:
    client = grpcclient.InferenceServerClient(url)
    return text_of(client.infer(model, inputs(grpcclient, prompt, image, **params)))


def stream_http(url: str, model: str, body: dict) -> list[tuple[float, dict]]:
    """POST generate_stream; (arrival time, event) for every SSE event."""
    events = []
    with requests.post(f"http://{url}/v2/models/{model}/generate_stream", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200, reply.text
        for line in reply.iter_lines():
            if line.startswith(b"data: "):
                events.append((time.monotonic(), json.loads(line[6:])))
    return events


def stream_grpc(url: str, model: str, prompt, image, **params) -> list[str]:
    """gRPC bidirectional streaming; the text of every response until the final one."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), results))
    try:
        client.async_stream_infer(model, inputs(grpcclient, prompt, image, **params), enable_empty_final_response=True)
        texts = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            if response.outputs:
                texts.append(text_of(result))
            if response.parameters["triton_final_response"].bool_param:
                return texts
    finally:
        client.stop_stream()


class GrpcStream:
    """One request over its own gRPC stream, read response by response."""

    def __init__(self, url: str, model: str, prompt, image, **params):
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=partial(lambda q, result, error: q.put((result, error)), self.responses))
        tensors = inputs(grpcclient, prompt, image, **params)
        self.client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.done = False

    def read(self, timeout: float = 120) -> None:
        """One more response; raises the server's error."""
        result, error = self.responses.get(timeout=timeout)
        if error is not None:
            self.done = True
            raise error
        response = result.get_response()
        if response.outputs:
            self.texts.append(text_of(result))
        if response.parameters["triton_final_response"].bool_param:
            self.done = True
            if response.outputs:
                self.finish_reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()

    def first_text(self) -> str:
        """Wait until the answer has begun (some text, or the end)."""
        while not self.done and not any(self.texts):
            self.read()
        return "".join(self.texts)

    def result(self) -> str:
        while not self.done:
            self.read()
        self.client.stop_stream()
        return "".join(self.texts)

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)


def llm_decoupled_grpc(url: str, messages: list, **parameters) -> list[dict]:
    """llm_decoupled over gRPC streaming: the chat in ``text_input``, the rest as request parameters."""
    stream = _ChatStream(url)
    try:
        tensor = grpcclient.InferInput("text_input", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([json.dumps(messages).encode()], dtype=np.object_))
        return stream.run("llm_decoupled", [tensor], parameters)
    finally:
        stream.close()


class _ChatStream:
    """One gRPC stream that collects every response until the final one."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.events: list = []
        self.done = threading.Event()
        self.client.start_stream(callback=self._on)

    def _on(self, result, error) -> None:
        self.events.append((result, error))
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            self.done.set()

    def run(self, model: str, tensors: list, parameters: dict) -> list[dict]:
        self.client.async_stream_infer(model, tensors, parameters=parameters, enable_empty_final_response=True)
        assert self.done.wait(120), "no final response"
        out = []
        for result, error in self.events:
            assert error is None, error
            if result.get_response().outputs:
                out.append(json.loads(result.as_numpy("text_output").reshape(-1)[0]))
        return out

    def close(self) -> None:
        self.client.stop_stream()


def chat_text(events: list[dict]) -> str:
    """The text of an llm_decoupled answer: its chunks joined (where chunks break depends on timing)."""
    return "".join(e.get("content", "") for e in events if e["type"] == "chunk")


def kill_under_load(url: str, image: bytes, kill, clients: int = 8, after_s: float = 8) -> dict:
    """``clients`` threads send llava infers to ``url`` without pause; after 3 s ``kill()``
    runs, and the load goes on ``after_s`` more. The outcome, by when each request was sent:
    ``answered_before`` (all done before the kill answered), ``in_flight`` and
    ``in_flight_failed``, ``sent_after`` and ``sent_after_failed`` (seconds after the kill)."""
    outcomes: list[tuple[float, float, bool]] = []  # sent, done, answered
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                infer_grpc(url, "llava", "What is this?", image, max_tokens=16)
                outcomes.append((sent, time.monotonic(), True))
            except InferenceServerException:
                outcomes.append((sent, time.monotonic(), False))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    killed = time.monotonic()
    kill()
    time.sleep(after_s)
    stop.set()
    for thread in threads:
        thread.join(60)
    in_flight = [ok for sent, done, ok in outcomes if sent < killed <= done]
    after = [(sent - killed, ok) for sent, done, ok in outcomes if sent >= killed]
    return {
        "answered_before": all(ok for _, done, ok in outcomes if done < killed),
        "in_flight": len(in_flight),
        "in_flight_failed": in_flight.count(False),
        "sent_after": len(after),
        "sent_after_failed": [round(at, 1) for at, ok in after if not ok],
    }


REPORTS = "vlm_scheduler_reports_total"  # the scheduler's reports, about one a second


def metric_samples(text: str, name: str, **labels: str) -> dict[tuple, float]:
    """The samples of metric ``name`` whose labels include ``labels``, by their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    }


def current_metrics(url: str, model: str | None = None, hang_s: float = 300) -> str:
    """The metrics page at ``url`` once every scheduler on it (or ``model``'s) has reported twice
    since this call began: all it measured before the call is then on the page. Waits for those
    reports, however long they take (``hang_s`` only guards against a server that never
    reports). A page without scheduler metrics (Dynamo's, say) is current as it is read."""
    labels = {} if model is None else {"model": model}
    text = requests.get(url, timeout=10).text
    first = metric_samples(text, REPORTS, **labels)
    if not first:
        return text
    deadline = time.monotonic() + hang_s
    while time.monotonic() < deadline:
        text = requests.get(url, timeout=10).text
        now = metric_samples(text, REPORTS, **labels)
        if all(now.get(series, 0) >= count + 2 for series, count in first.items()):
            return text
        time.sleep(0.05)
    raise AssertionError(f"the scheduler at {url} did not report for {hang_s:g} s")


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (Triton's metrics port), as
    of this call: read once the schedulers have reported what they measured before it."""
    text = current_metrics(f"http://{metrics_url}/metrics", labels.get("model"))
    return sum(metric_samples(text, name, **labels).values())
