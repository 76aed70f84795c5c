"""End-to-end through nginx: page, KServe v2 with tritonclient, OpenAI SDK streaming, SSE,
blocked admin APIs, body limit, and Prometheus seeing every target and model."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time

import httpx
import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import FOREIGN_STUBS
from tests.integration.helpers import GREEDY, MODELS, inputs, text_of


def test_web_page_and_docs_load(stack):
    page = httpx.get(stack.url + "/", timeout=10)
    assert page.status_code == 200 and "vlm-serve" in page.text
    assert httpx.get(stack.url + "/static/app.js", timeout=10).status_code == 200
    assert httpx.get(stack.url + "/docs", timeout=10).status_code == 200
    assert httpx.get(stack.url + "/health/ready", timeout=10).json()["status"] == "ready"
    assert "x-request-id" in page.headers


@pytest.mark.parametrize("model", MODELS)
def test_tritonclient_http_infer_through_nginx(stack, model, png):
    client = httpclient.InferenceServerClient(stack.host_port)
    assert client.is_server_ready() and client.is_model_ready(model)
    result = client.infer(model, inputs(httpclient, "What is in this image?", png, max_tokens=8, **GREEDY))
    assert text_of(result).strip()


def test_tritonclient_grpc_through_nginx(stack, jpeg):
    client = grpcclient.InferenceServerClient(stack.grpc_url)
    assert client.is_server_ready()
    result = client.infer("llava", inputs(grpcclient, "What is this?", jpeg, max_tokens=6, **GREEDY))
    assert text_of(result).strip()


def test_openai_sdk_streaming_through_nginx(stack, png):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    chunks = client.chat.completions.create(
        model="qwen3-vl",
        max_tokens=12,
        temperature=0.0,
        stream=True,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert deltas and "".join(deltas).strip()  # how many deltas depends on timing


def test_stub_like_processes_of_others_survive_the_stacks_start(stack):
    """The stack kills only stubs its own tritonserver started: a stub-like process with no
    mark or another deployment's mark, started before ``up``, is still there (the fixture
    checks again after ``down``)."""
    if not FOREIGN_STUBS:
        pytest.skip("the stack was started elsewhere (E2E_STACK_URL): no stub-like processes were planted")
    assert [stub.poll() for stub in FOREIGN_STUBS] == [None, None]


def test_generate_stream_arrives_over_time_not_in_one_lump(stack):
    start = time.monotonic()
    arrivals = []
    body = {"prompt": "Describe the picture in detail.", "max_tokens": 64, "temperature": 0.0}
    with requests.post(
        f"{stack.url}/v2/models/moondream2_stream/generate_stream", json=body, stream=True, timeout=120
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for block in reply.iter_content(chunk_size=None):
            arrivals.append((time.monotonic() - start, block.count(b"data: ")))
    events = sum(n for _, n in arrivals)
    # How many events and reads there are depends on timing (Triton's sender joins what piled
    # up while it was busy; a client that reads late gets several events at once), so only
    # what a buffering proxy cannot give is asserted: the events came in more than one read.
    # tests/integration/test_cancellation.py proves streaming on every way in without timing.
    assert events >= 2, f"only {events} events"
    first, last = arrivals[0][0], arrivals[-1][0]
    assert len(arrivals) >= 2 and last > first, f"the events came in {len(arrivals)} reads: buffered"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/llava/load"),
        ("POST", "/v2/repository/models/llava/unload"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/trace/setting"),
        ("GET", "/v2/logging"),
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/models/llava/stats"),
        ("GET", "/v2/models/llava/versions/1/stats"),
        ("GET", "/metrics"),
    ],
)
def test_triton_admin_apis_are_blocked(stack, method, path):
    reply = httpx.request(method, stack.url + path, timeout=10)
    expected = 404 if path == "/metrics" else 403  # the service's metrics are for Prometheus only
    assert reply.status_code == expected, f"{method} {path}: {reply.status_code}"


def test_inference_apis_stay_open(stack):
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/llava",
        "/v2/models/llava/ready",
        "/v2/models/llava/config",
        "/v2/models/llava/versions/1",
    ):
        assert httpx.get(stack.url + path, timeout=10).status_code == 200, path


def test_a_30_mb_body_gets_413_with_json(stack):
    reply = httpx.post(
        stack.url + "/v1/chat/completions",
        content=b"x" * (30 * 1024 * 1024),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 413
    assert "over the gateway limit" in reply.json()["error"]["message"]


def _query(stack, expr: str) -> list[dict]:
    reply = httpx.get(stack.prometheus_url + "/api/v1/query", params={"query": expr}, timeout=10)
    return reply.json()["data"]["result"]


def test_prometheus_scrapes_every_target_and_sees_every_model(stack, png):
    for model in MODELS:  # traffic for every model, through nginx
        client = httpclient.InferenceServerClient(stack.host_port)
        client.infer(model, inputs(httpclient, "What is this?", png, max_tokens=4, **GREEDY))
    deadline = time.monotonic() + 60
    while True:
        up = {r["metric"]["job"]: r["value"][1] for r in _query(stack, "up")}
        seen = {r["metric"]["model"] for r in _query(stack, "nv_inference_request_success > 0")}
        scheduled = {r["metric"]["model"] for r in _query(stack, "vlm_scheduler_generated_tokens_total > 0")}
        if (
            set(up) >= {"triton", "fastapi", "nginx", "prometheus"}
            and set(up.values()) == {"1"}
            and seen >= set(MODELS)
            and scheduled >= set(MODELS)
        ):
            break
        assert time.monotonic() < deadline, f"targets {up}, models with successes {seen}, scheduled {scheduled}"
        time.sleep(2)
    rules = httpx.get(stack.prometheus_url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    names = {rule["name"] for group in rules for rule in group["rules"]}
    assert {"vlm:batch_size_mean", "vlm:running_rows", "vlm:ttft_p95_seconds", "VLMSchedulerSaturated"} <= names


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("TRACE", "/", "GET, HEAD"),
        ("TRACE", "/v1/chat/completions", "POST"),
        ("TRACE", "/api/sessions/abc", "GET, DELETE"),
        ("PUT", "/v1/models", "GET"),  # the service's own 405
        ("DELETE", "/v1/chat/completions", "POST"),
        ("TRACE", "/v1/messages", "POST"),
        ("TRACE", "/v1/responses/resp_1", "GET, DELETE"),
        ("PUT", "/v1/responses/resp_1", "GET, DELETE"),  # the service's own
        ("GET", "/v1/completions", "POST"),
    ],
)
def test_unsupported_methods_get_405_with_allow(stack, method, path, allow):
    reply = httpx.request(method, stack.url + path, timeout=10)
    assert reply.status_code == 405, reply.text
    assert reply.headers["allow"] == allow
    assert_shape(path, reply.json())


def assert_shape(path: str, body: dict) -> None:
    """The error body of the API ``path`` belongs to (fastapi_app/error_shapes.py)."""
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    elif path.startswith("/api/"):
        assert set(body) == {"detail", "code"}, body
    elif path.startswith("/v2"):
        assert isinstance(body["error"], str), body
    else:  # /v1 and the rest (the page)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


@pytest.mark.parametrize(
    "path", ["/v1/messages", "/v1/responses", "/v1/completions", "/api/chat", "/v2/models/llava/infer"]
)
def test_a_body_over_the_gateway_limit_is_a_413_in_the_paths_shape(stack, path):
    """nginx refuses on the announced length, before reading the body (raw socket: no client
    sends 26 MB here)."""
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**9}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413", head
    assert_shape(path, json.loads(body))


@pytest.mark.parametrize(
    ("method", "path", "shape"),
    [
        ("DELETE", "/api/sessions/%00%C2%85", "api"),  # schemathesis' stateful phase sent this
        ("GET", "/v1/models%2", "openai"),  # a broken %-escape
        ("GET", "/v2/models/%00/ready", "kserve"),
        ("POST", "/v1/messages/%00", "anthropic"),
    ],
)
def test_a_path_nginx_cannot_parse_gets_json_not_html(stack, method, path, shape):
    # raw http.client: httpx would re-escape the path
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path)
        reply = connection.getresponse()
        status, kind, body = reply.status, reply.getheader("content-type"), json.loads(reply.read())
    finally:
        connection.close()
    assert (status, kind) == (400, "application/json")
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    elif shape == "api":
        assert body["code"] == "bad_request" and "NUL" in body["detail"]
    elif shape == "openai":
        assert body["error"]["code"] == "bad_request" and body["error"]["type"] == "invalid_request_error"
    else:
        assert "NUL" in body["error"]


def test_openapi_declares_every_error_with_its_schema(stack):
    document = httpx.get(stack.url + "/openapi.json", timeout=10).json()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            statuses = set(operation["responses"])
            assert "422" not in statuses, path
            if path.startswith(("/v1/", "/api/")):
                assert {"400", "401", "404", "413", "429", "503"} <= statuses, (path, statuses)
                body = operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
                kind = "AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"
                assert body.endswith(kind if path.startswith("/v1/") else "APIError")
    assert "503" in document["paths"]["/health/ready"]["get"]["responses"]
