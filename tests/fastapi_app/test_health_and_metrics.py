"""Health, metrics, the OpenAPI page, and Triton going down and coming back."""

from __future__ import annotations

import re
import time

import httpx

from tests.conftest import start_triton
from tests.fastapi_app.conftest import ApiProcess
from tests.fastapi_app.test_openai_api import vision_messages


def test_health_ready_and_docs(api):
    assert httpx.get(api.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(api.url + "/health/ready").json()
    assert ready["status"] == "ready" and ready["backend"] == "triton" and all(ready["models"].values())
    docs = httpx.get(api.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/v1/chat/completions" in httpx.get(api.url + "/openapi.json").json()["paths"]


def test_metrics_after_traffic(api, png):
    body = {"model": "llava", "messages": vision_messages(png), "max_tokens": 6, "stream": True}
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        list(reply.iter_lines())
    text = httpx.get(api.url + "/metrics").text
    for pattern in (
        r'vlm_time_to_first_token_seconds_bucket\{le="[^"]+",model="llava"\} [1-9]',
        r'vlm_inter_token_seconds_count\{model="llava"\} [1-9]',
        r'vlm_output_tokens_total\{model="llava"\} [1-9]',
        r'vlm_generation_duration_seconds_count\{model="llava"\} [1-9]',
        r'vlm_http_requests_total\{method="POST",route="/v1/chat/completions",status="200"\} [1-9]',
        r'vlm_http_request_duration_seconds_bucket\{le="[^"]+",route="/v1/chat/completions"\} [1-9]',
        r"vlm_http_requests_in_flight\{route=",
    ):
        assert re.search(pattern, text), f"missing {pattern}"


def test_triton_down_gives_503_and_recovers_without_a_restart(tiny_models_dir, tmp_path, png):
    triton = start_triton(tiny_models_dir, "tritonserver-restart.log", models=["llava", "llava_stream"])
    env = {"TRITON_GRPC_URL": triton.grpc_url, "SERVED_MODELS": "llava", "HISTORY_DB": str(tmp_path / "h.db")}
    api = ApiProcess("api-triton-restart", env).start()
    body = {"model": "llava", "messages": vision_messages(png), "max_tokens": 4}
    ports = {"http_port": triton.http_port, "grpc_port": triton.grpc_port, "metrics_port": triton.metrics_port}
    try:
        assert httpx.post(api.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        triton.stop()
        down = httpx.post(api.url + "/v1/chat/completions", json=body, timeout=60)
        assert down.status_code == 503, down.text
        assert "Triton at" in down.json()["error"]["message"] and "unavailable" in down.json()["error"]["message"]
        assert httpx.get(api.url + "/health/ready").status_code == 503
        assert httpx.get(api.url + "/health").status_code == 200
        triton = start_triton(tiny_models_dir, "tritonserver-restart.log", models=["llava", "llava_stream"], **ports)
        deadline = time.monotonic() + 60
        while httpx.get(api.url + "/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "service did not see Triton come back"
            time.sleep(0.5)
        again = httpx.post(api.url + "/v1/chat/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
    finally:
        api.stop()
        triton.stop()
