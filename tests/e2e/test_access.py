"""The gateway's door, in a local stack of its own started with ``API_KEYS`` and small
per-client limits: 401 with the OpenAI error body without a key, every route with one,
health and the page open, the page asking for the key, the key in no log; 429 with
Retry-After past the limits; security headers on the page."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from playwright.sync_api import expect, sync_playwright
from tritonclient.utils import InferenceServerException

from fastapi_app.page_security import PAGE_CSP
from tests.conftest import ARTIFACTS, ROOT
from tests.fastapi_app.test_web_page import CHROMIUM, FLAGS
from tests.integration.helpers import GREEDY, inputs, text_of
from vlm_stack.procs import ephemeral_stack_env
from vlm_stack.supervisor import Supervisor

KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class KeyedStack:
    url: str
    grpc_url: str
    run_dir: object


@pytest.fixture(scope="module")
def keyed(tiny_models_dir):
    if os.environ.get("E2E_STACK_URL"):
        pytest.skip("this module starts a local stack of its own")
    run_dir = ARTIFACTS / "stack-keys"
    env = {**ephemeral_stack_env(run_dir, tiny_models_dir), "API_KEYS": f"other-key,{KEY}", "VLM_STACK_MODE": "local"}
    env["SERVED_MODELS"] = "llava"
    env.update(NGINX_RATE="5", NGINX_BURST="20", NGINX_CONNECTIONS="8")  # small, to reach them here

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["./triton_start.sh", command], cwd=ROOT, env=env, text=True, capture_output=True)

    up = run("up")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    try:
        yield KeyedStack(f"http://127.0.0.1:{env['NGINX_PORT']}", f"127.0.0.1:{env['NGINX_GRPC_PORT']}", run_dir)
    finally:
        run("down")


def test_health_and_the_page_stay_open(keyed):
    for path in ("/health", "/health/ready", "/", "/static/app.js", "/v2/health/ready"):
        assert httpx.get(keyed.url + path, timeout=10).status_code == 200, path


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_v1_and_api_need_the_key(keyed, headers):
    reply = httpx.get(keyed.url + "/v1/models", headers=headers, timeout=10)
    assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith("Bearer")
    assert reply.json()["error"]["code"] == "invalid_api_key"
    chat = httpx.post(keyed.url + "/api/chat", json={"prompt": "hi", "model": "llava"}, headers=headers, timeout=10)
    assert chat.status_code == 401 and chat.json()["code"] == "invalid_api_key"


def test_the_anthropic_sdk_with_x_api_key(keyed):
    """Anthropic's clients send ``x-api-key``; a wrong one is Anthropic's authentication_error."""
    turn = [{"role": "user", "content": "Hello?"}]
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0).messages.create(
            model="llava", max_tokens=3, messages=turn
        )
    assert refused.value.body["error"]["type"] == "authentication_error"
    client = anthropic.Anthropic(base_url=keyed.url, api_key=KEY, max_retries=0, timeout=60)
    assert client.messages.create(model="llava", max_tokens=3, messages=turn).content[0].text


def test_the_openai_sdk_with_and_without_the_key(keyed):
    with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="llava", messages=[{"role": "user", "content": "Hello?"}], max_tokens=3, temperature=0
    )
    assert reply.choices[0].message.content


def test_triton_http_routes_need_the_key(keyed, png):
    blocked = httpx.get(keyed.url + "/v2/models/llava/config", timeout=10)
    assert blocked.status_code == 401 and blocked.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/v2/models/llava/config", headers=dict(AUTH), timeout=10).status_code == 200
    host = keyed.url.split("://", 1)[1]
    with pytest.raises(InferenceServerException):
        httpclient.InferenceServerClient(host).infer("llava", inputs(httpclient, "Hi", png, max_tokens=3))
    result = httpclient.InferenceServerClient(host).infer(
        "llava", inputs(httpclient, "Hi", png, max_tokens=3, **GREEDY), headers=dict(AUTH)
    )
    assert text_of(result)


def test_triton_grpc_needs_the_key_but_health_is_open(keyed, png):
    client = grpcclient.InferenceServerClient(keyed.grpc_url)
    assert client.is_server_ready()
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer("llava", inputs(grpcclient, "Hi", png, max_tokens=3))
    metadata = {"authorization": AUTH["Authorization"]}  # gRPC metadata keys are lower case
    result = client.infer("llava", inputs(grpcclient, "Hi", png, max_tokens=3, **GREEDY), headers=metadata)
    assert text_of(result)


def test_with_the_service_down_nothing_passes_the_key_check(keyed):
    """The key check asks the service: with it stopped, Triton's routes refuse (a JSON 503,
    gRPC UNAVAILABLE); nothing is let through unchecked."""
    supervisor = Supervisor(Path(keyed.run_dir))
    supervisor.rpc().stopProcess("fastapi", True)
    try:
        with pytest.raises(InferenceServerException) as refused:
            grpcclient.InferenceServerClient(keyed.grpc_url).get_server_metadata()
        assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
        for headers in ({}, AUTH):  # without a key, and with one that cannot be checked now
            reply = httpx.get(keyed.url + "/v2/models/llava/config", headers=headers, timeout=10)
            assert reply.status_code == 503 and "not answering" in reply.json()["error"], reply.text
            assert reply.headers["retry-after"] == "1"
    finally:
        supervisor.start_program("fastapi")
    deadline = time.monotonic() + 60
    while httpx.get(keyed.url + "/health/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the service did not come back"
        time.sleep(0.5)


def test_the_api_docs_come_through_nginx_offline_under_the_page_policy(keyed):
    """/docs keeps the page's policy behind nginx (the same string as the service's) and its
    Swagger UI renders every operation from the stack's own files."""
    docs, page = httpx.get(keyed.url + "/docs", timeout=10), httpx.get(keyed.url + "/", timeout=10)
    assert docs.headers["content-security-policy"] == page.headers["content-security-policy"] == PAGE_CSP
    assert docs.headers["x-frame-options"] == "DENY"
    document = httpx.get(keyed.url + "/openapi.json", timeout=10).json()
    count = sum(1 for item in document["paths"].values() for method in item if method != "parameters")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(keyed.url + "/docs")
        expect(page.locator(".opblock")).to_have_count(count, timeout=30_000)
        browser.close()
    assert errors == []


def test_the_page_asks_for_the_key(keyed):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(keyed.url + "/")
        expect(page.locator("#key-pane")).to_be_visible(timeout=20_000)
        expect(page.locator("#error")).to_contain_text("needs an API key")
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        expect(page.locator("#model option")).to_have_count(1, timeout=20_000)
        expect(page.locator("#key-pane")).to_be_hidden()
        page.fill("#prompt", "Hello?")
        page.click("#send")
        expect(page.locator("#log li.assistant .meta")).to_contain_text("llava", timeout=60_000)
        browser.close()


def test_the_key_is_in_no_log(keyed):
    logs = list((keyed.run_dir / "logs").glob("*.log"))
    assert logs
    for path in logs:
        assert KEY not in path.read_text(errors="replace"), f"the key is written in {path}"


def test_past_the_per_client_limits_a_json_429_with_retry_after(keyed):
    time.sleep(4)  # the bucket refills (5/s)

    paths = ["/v1/models", "/api/sessions/none", "/v1/messages/batches"]  # OpenAI's, REST's, Anthropic's

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=keyed.url, headers=dict(AUTH), timeout=30) as client:
            return await asyncio.gather(*(client.get(paths[i % 3]) for i in range(90)))

    replies = asyncio.run(burst())
    limited = [r for r in replies if r.status_code == 429]
    assert limited and any(r.status_code == 200 for r in replies)
    assert all(r.headers["retry-after"] == "1" for r in limited)
    shapes = {
        "/v1/models": lambda body: body["error"]["code"] == "rate_limited",
        "/api/sessions/none": lambda body: body["code"] == "rate_limited" and "detail" in body,
        "/v1/messages/batches": lambda body: body["error"]["type"] == "rate_limit_error" and body["type"] == "error",
    }
    assert {r.request.url.path for r in limited} == set(paths)  # 90 at once past a burst of 20
    assert all(shapes[r.request.url.path](r.json()) for r in limited)
    assert httpx.get(keyed.url + "/health/ready", timeout=10).status_code == 200  # health is never limited
    time.sleep(4)


def test_the_page_has_security_headers_and_no_server_version(keyed):
    page = httpx.get(keyed.url + "/", timeout=10)
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
    assert page.headers["server"] == "nginx"  # server_tokens off: no version
    assert httpx.get(keyed.url + "/static/app.js", timeout=10).headers["x-content-type-options"] == "nosniff"
