"""The stack without Triton (issue 20): ``INFERENCE_BACKEND=local ./triton_start.sh up`` starts
no tritonserver; nginx sends ``/v2`` to the service, which answers KServe v2 itself, and the
unmodified ``tritonclient.http`` gets the answer a real tritonserver gives."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import requests
import tritonclient.http as httpclient

from tests.conftest import ARTIFACTS, TRITON_ENV, _run, _up
from tests.integration.helpers import GREEDY, infer_http, inputs, stream_http, text_of
from vlm_stack.procs import ephemeral_stack_env

PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def no_triton_stack(tiny_models_dir):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = ephemeral_stack_env(run_dir, tiny_models_dir) | TRITON_ENV
        env |= {"INFERENCE_BACKEND": "local", "SERVED_MODELS": "llava", "VLM_STACK_MODE": ""}
        up = _up(env, ARTIFACTS / "stack-no-triton-up.log")
        try:
            assert up.returncode == 0, f"stack did not come up:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
            yield env, up.stdout, run_dir
        finally:
            down = _run("down", env)
            assert down.returncode == 0, down.stdout + down.stderr


def test_no_tritonserver_runs(no_triton_stack):
    env, output, _ = no_triton_stack
    assert "[stack] mode: local" in output, "INFERENCE_BACKEND=local picks local processes"
    assert "no tritonserver" in output
    status = _run("status", env).stdout.splitlines()
    assert any(line.startswith("fastapi") and "ready" in line for line in status), status
    assert not any(line.startswith("triton") for line in status), status


def test_tritonclient_through_nginx_gets_tritons_answer(no_triton_stack, triton, png):
    env, _, _ = no_triton_stack
    gateway = f"127.0.0.1:{env['NGINX_PORT']}"
    client = httpclient.InferenceServerClient(gateway)
    assert client.is_server_ready() and client.is_model_ready("llava")
    assert (
        client.get_model_metadata("llava")["inputs"]
        == httpclient.InferenceServerClient(triton.http_url).get_model_metadata("llava")["inputs"]
    )
    ours = text_of(client.infer("llava", inputs(httpclient, PROMPT, png, max_tokens=12, **GREEDY)))
    assert ours == infer_http(triton.http_url, "llava", PROMPT, png, max_tokens=12, **GREEDY)
    body = {"prompt": PROMPT, "image": list(png), "max_tokens": 12, "temperature": 0.0}
    events = stream_http(gateway, "llava_stream", body)
    assert "".join(e["generated_text"] for _, e in events) == ours and len(events) >= 3
    reply = requests.post(f"http://{gateway}/v2/models/llava/infer", json={"inputs": []}, timeout=30)
    assert reply.status_code == 400 and "prompt" in reply.json()["error"]
