"""A client that leaves frees its row, through every way in (issue 19): KServe infer on the
face, generate_stream, gRPC streaming, the OpenAI route (streamed and not) and /api/chat.
Each request would run 1,500 tokens (IGNORE_EOS); the client leaves after it has begun; the
running-rows gauge must drop to 0 and far fewer tokens be generated."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.conftest import image_bytes, start_triton
from tests.fastapi_app.conftest import ApiProcess, api_env
from tests.integration.helpers import GrpcStream, inputs, metric

MODEL = "llava"
LONG = 1500
RUNNING, TOKENS = "vlm_scheduler_running_rows", "vlm_scheduler_generated_tokens_total"
IMAGE = image_bytes((64, 64), "PNG", (90, 30, 200))


@pytest.fixture(scope="module")
def long_triton(tiny_models_dir):
    env = {"MAX_TOKENS_CAP": str(LONG), "LLAVA_IGNORE_EOS": "true"}
    server = start_triton(tiny_models_dir, "tritonserver-cancel.log", models=[MODEL, f"{MODEL}_stream"], env=env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_api(long_triton, tmp_path_factory):
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=long_triton.grpc_url, MAX_TOKENS_CAP=str(LONG), SERVED_MODELS=MODEL)
    server = ApiProcess("api-cancel", env).start()
    yield server
    server.stop()


def running(triton) -> float:
    return metric(triton.metrics_url, RUNNING, model=MODEL)


def wait_running(triton, rows: int, deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if running(triton) == rows:
            return True
    return running(triton) == rows


def kserve_infer(triton, _api) -> None:
    """KServe infer over gRPC, cancelled by the client (Triton's HTTP frontend cannot cancel a
    request: only its gRPC frontend and C API can, so an HTTP infer whose client leaves runs on)."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    done = threading.Event()
    call = client.async_infer(
        MODEL, inputs(grpcclient, "Describe this.", IMAGE, max_tokens=LONG), lambda result, error: done.set()
    )
    assert wait_running(triton, 1, 10), "the infer did not start"
    call.cancel()
    done.wait(10)
    client.close()


def generate_stream(triton, _api) -> None:
    body = {"prompt": "Describe this.", "image": list(IMAGE), "max_tokens": LONG}
    url = f"http://{triton.http_url}/v2/models/{MODEL}_stream/generate_stream"
    with requests.post(url, json=body, stream=True, timeout=60) as reply:
        next(line for line in reply.iter_lines() if line.startswith(b"data:"))
    # leaving the block closes the connection


def grpc_stream(triton, _api) -> None:
    stream = GrpcStream(triton.grpc_url, f"{MODEL}_stream", "Describe this.", IMAGE, max_tokens=LONG)
    stream.first_text()
    stream.cancel()


def _openai_body(stream: bool) -> dict:
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    content = [{"type": "text", "text": "Describe this."}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": LONG, "stream": stream}


def openai_streamed(_triton, api) -> None:
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=_openai_body(True), timeout=60) as reply:
        next(line for line in reply.iter_lines() if '"content":' in line and '"content": ""' not in line)


def openai_plain(_triton, api) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.url + "/v1/chat/completions", json=_openai_body(False), timeout=2.0)


def api_chat(_triton, api) -> None:
    body = {"model": MODEL, "prompt": "Describe this.", "image": base64.b64encode(IMAGE).decode()}
    body |= {"max_tokens": LONG, "stream": True}
    with httpx.stream("POST", api.url + "/api/chat", json=body, timeout=60) as reply:
        next(line for line in reply.iter_lines() if '"chunk"' in line)


@pytest.mark.parametrize(
    "leave",
    [kserve_infer, generate_stream, grpc_stream, openai_streamed, openai_plain, api_chat],
    ids=lambda f: f.__name__,
)
def test_a_client_that_leaves_frees_its_row(long_triton, long_api, leave):
    assert wait_running(long_triton, 0, 10), "a row of an earlier test still runs"
    before = metric(long_triton.metrics_url, TOKENS, model=MODEL)
    left = threading.Event()

    def client() -> None:
        try:
            leave(long_triton, long_api)
        finally:
            left.set()

    worker = threading.Thread(target=client)
    worker.start()
    assert left.wait(60), f"{leave.__name__}: the client never got going"
    worker.join()
    gone_at = time.monotonic()
    assert wait_running(long_triton, 0, 5), f"{leave.__name__}: the row still runs 5 s after its client left"
    freed_s = time.monotonic() - gone_at
    generated = metric(long_triton.metrics_url, TOKENS, model=MODEL) - before
    assert generated < LONG / 2, f"{leave.__name__}: {generated} tokens generated: the row ran on"
    print(json.dumps({"way": leave.__name__, "freed_within_s": round(freed_s, 2), "tokens": generated}))
