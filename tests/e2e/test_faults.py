"""Faults in the local stack: a model's stub, the service and tritonserver killed with
SIGKILL. Each comes back by itself, readiness says "not ready" (naming the model) while it
does, and each test leaves the stack healthy again for the tests after it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ARTIFACTS
from vlm_stack.supervisor import Supervisor
from vlm_triton.serve import children, stub_processes

RUN_DIR = ARTIFACTS / "stack"
RECOVERY_S = 300  # a guard against a hang, not a target: the recovery times are figures (artifacts/recovery-*.txt)
PROMPT = {"model": "llava", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def local(stack):
    if os.environ.get("E2E_STACK_URL"):
        pytest.skip("faults in Compose are injected by scripts/compose_test.sh")  # not the local runner's
    return Supervisor(RUN_DIR)


def _tritonserver_pid(supervisor: Supervisor) -> int:
    (pid,) = [p for p in children(supervisor.pid("triton")) if "tritonserver" in Path(f"/proc/{p}/comm").read_text()]
    return pid


def _ready(stack) -> tuple[int, dict]:
    try:
        reply = httpx.get(stack.url + "/health/ready", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    json_body = reply.headers.get("content-type", "").startswith("application/json")
    return reply.status_code, reply.json() if json_body else {}


def _wait_ready(stack, started: float, timeout_s: float) -> tuple[float, list[dict]]:
    """Once the fault shows (readiness not 200), the seconds from ``started`` until it is
    200 again, and the not-ready bodies seen meanwhile."""
    seen: list[dict] = []
    while time.monotonic() - started < timeout_s:
        status, body = _ready(stack)
        if status == 200 and seen:
            return time.monotonic() - started, seen
        if status != 200:
            seen.append(body)
        time.sleep(0.1)
    raise AssertionError(f"not ready again within {timeout_s} s (seen: {seen[:3]})")


def _answers(stack) -> str:
    reply = httpx.post(stack.url + "/v1/chat/completions", json=PROMPT, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_a_killed_model_stub_is_reloaded_and_reported_until_then(stack, local):
    before = _answers(stack)
    stubs = stub_processes(_tritonserver_pid(local))
    (victim,) = [pid for pid, model in stubs.items() if model == "llava_stream"]
    service_pid = local.pid("fastapi")
    os.kill(victim, signal.SIGKILL)
    recovered, seen = _wait_ready(stack, time.monotonic(), RECOVERY_S)
    # llava, and maybe others too: a probe that Triton, busy reloading, answers late counts all as not ready
    assert any("llava" in body.get("not_ready", []) for body in seen), f"readiness never named llava: {seen[:3]}"
    assert _answers(stack) == before
    assert local.pid("fastapi") == service_pid, "the service was not restarted for it"
    log = (RUN_DIR / "logs" / "triton.log").read_text(errors="replace")
    assert f"stub process {victim} died" in log and "llava_stream: reloaded" in log
    (ARTIFACTS / "recovery-stub.txt").write_text(f"{recovered:.1f}\n")


def test_a_killed_service_is_restarted_by_the_supervisor(stack, local):
    pid = local.pid("fastapi")
    os.kill(pid, signal.SIGKILL)
    recovered, _ = _wait_ready(stack, time.monotonic(), RECOVERY_S)
    assert local.pid("fastapi") not in (None, pid)
    assert _answers(stack)
    log = (RUN_DIR / "logs" / "supervisord.log").read_text()
    assert "exited: fastapi (terminated by SIGKILL; not expected)" in log
    (ARTIFACTS / "recovery-service.txt").write_text(f"{recovered:.1f}\n")


def test_the_gateway_says_json_503_while_the_service_is_down(stack, local):
    """No upstream to answer: nginx's own 502 page becomes a JSON 503 with Retry-After."""
    local.rpc().stopProcess("fastapi", True)
    try:
        for path, method, key in (
            ("/v1/chat/completions", "POST", "error"),
            ("/v1/models", "GET", "error"),
            ("/api/sessions/x", "GET", "detail"),
            ("/health/ready", "GET", "error"),
        ):
            reply = httpx.request(method, stack.url + path, json=PROMPT if method == "POST" else None, timeout=10)
            assert reply.status_code == 503, (path, reply.status_code, reply.text)
            assert reply.headers["retry-after"] == "1" and reply.headers.get("x-request-id"), path
            body = reply.json()[key]
            assert "not answering" in (body if isinstance(body, str) else body["message"]), (path, body)
    finally:
        local.start_program("fastapi")
    deadline = time.monotonic() + RECOVERY_S
    while _ready(stack)[0] != 200:
        assert time.monotonic() < deadline, "the service did not come back"
        time.sleep(0.2)
    assert _answers(stack)


def _stubs_of(server_pid: int) -> list[int]:
    """Python-backend stubs that name ``server_pid`` as their server (their 6th argument)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(args) > 5 and args[0].endswith(b"triton_python_backend_stub") and args[5] == str(server_pid).encode():
            found.append(int(entry.name))
    return found


def test_a_killed_tritonserver_comes_back_and_the_service_reconnects(stack, local):
    service_pid = local.pid("fastapi")
    server_pid = _tritonserver_pid(local)
    assert _stubs_of(server_pid), "no stub names its server: the check below would prove nothing"
    os.kill(server_pid, signal.SIGKILL)
    killed = time.monotonic()
    # meanwhile nginx's gRPC port says UNAVAILABLE with a reason (Triton opens its ports
    # only after its models are loaded again)
    with pytest.raises(InferenceServerException, match="not answering") as refused:
        grpcclient.InferenceServerClient(stack.grpc_url).is_server_live(client_timeout=10)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    recovered, seen = _wait_ready(stack, killed, 180)
    assert any(body.get("status") == "not ready" for body in seen), "the service never said 'not ready'"
    assert _answers(stack)
    assert local.pid("fastapi") == service_pid, "the service reconnects without a restart"
    assert "exited: triton" in (RUN_DIR / "logs" / "supervisord.log").read_text()
    assert _stubs_of(server_pid) == [], "the dead server's stubs live on (vlm_triton.serve kills them)"
    (ARTIFACTS / "recovery-tritonserver.txt").write_text(f"{recovered:.1f}\n")
