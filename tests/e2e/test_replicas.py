"""Two Triton replicas on one host (``TRITON_REPLICAS=2``), in a local stack of its own:
nginx spreads KServe requests over both (least_conn), the service spreads its gRPC streams
over both (round-robin), Prometheus scrapes each, and with one replica killed the other
serves alone while the dead one is brought back; one stopped gently loses no chat."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tritonclient.http as httpclient

from tests.conftest import ARTIFACTS, ROOT
from tests.integration.helpers import GREEDY, inputs, metric, text_of
from vlm_stack.config import StackConfig
from vlm_stack.procs import ephemeral_stack_env
from vlm_stack.supervisor import Supervisor

CHAT = {"model": "llava", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 4, "temperature": 0}
KSERVE = {
    "inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["Hi?"]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [4]},
    ]
}


@pytest.fixture(scope="module")
def replicated(tiny_models_dir):
    if os.environ.get("E2E_STACK_URL"):
        pytest.skip("this module starts a local stack of its own")
    run_dir = ARTIFACTS / "stack-replicas"
    env = {**ephemeral_stack_env(run_dir, tiny_models_dir), "TRITON_REPLICAS": "2", "VLM_STACK_MODE": "local"}

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["./triton_start.sh", command], cwd=ROOT, env=env, text=True, capture_output=True)

    up = run("up")
    (ARTIFACTS / "stack-replicas-up.log").write_text(up.stdout + up.stderr)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    try:
        yield StackConfig.from_env(env)
    finally:
        run("down")


def served(replica, model: str) -> float:
    return metric(
        f"127.0.0.1:{replica.metrics_port}", "nv_inference_request_success_total", model=model
    )  # the parser adds _total


def test_kserve_requests_through_nginx_reach_both_replicas(replicated, png):
    gateway = f"127.0.0.1:{replicated.nginx_port}"

    def infer(i: int) -> str:
        client = httpclient.InferenceServerClient(gateway, network_timeout=120)
        return text_of(client.infer("llava", inputs(httpclient, f"Picture {i}?", png, max_tokens=8, **GREEDY)))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(infer, range(24)))
    counts = [served(r, "llava") for r in replicated.replicas()]
    assert all(c > 0 for c in counts) and sum(counts) >= 24, counts


def test_the_service_spreads_its_streams_over_both_replicas(replicated):
    """gRPC's round-robin channel sends only to the replicas it has connected, so a first burst
    can all go to one: rounds of 12 chats (every one answered) go on until both have had two."""
    before = [served(r, "llava_stream") - served(r, "llava") for r in replicated.replicas()]
    sent = 0
    for _ in range(5):
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: httpx.post(_url(replicated), json=CHAT, timeout=120), range(12)))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
        sent += 12
        # llava_stream's requests that did not come from the llava facade came from the service
        after = [served(r, "llava_stream") - served(r, "llava") for r in replicated.replicas()]
        spread = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(spread) == sent, spread
        if all(s >= 2 for s in spread):
            return
    raise AssertionError(f"after {sent} chats one replica had fewer than two: {spread}")


def test_prometheus_scrapes_each_replica(replicated):
    query = f"http://127.0.0.1:{replicated.prometheus_port}/api/v1/query"
    deadline = time.monotonic() + 300  # a guard: scrapes come every few seconds
    # this stack's replicas (an earlier run's series may still be in the TSDB: same labels, other ports)
    ports = "|".join(str(r.metrics_port) for r in replicated.replicas())
    expr = f'up{{job="triton", instance=~"127.0.0.1:({ports})"}}'
    while True:
        result = httpx.get(query, params={"query": expr}, timeout=10).json()["data"]["result"]
        states = {r["metric"]["replica"]: r["value"][1] for r in result}
        if states == {"triton": "1", "triton-1": "1"}:
            return
        assert time.monotonic() < deadline, states
        time.sleep(2)


def test_one_replica_killed_the_other_serves_alone(replicated, png):
    supervisor = Supervisor(Path(replicated.run_dir))
    victim = supervisor.pid("triton-1")
    subprocess.run(["pkill", "-KILL", "-P", str(victim)], check=False)  # its tritonserver
    os.kill(victim, 9)
    assert not _ready(replicated.replicas()[1]), "replica 1 still answers"  # what follows runs without it
    for _ in range(5):  # a fixed number of rounds, however long each takes while replica 1 restarts
        assert httpx.get(f"http://127.0.0.1:{replicated.nginx_port}/health/ready", timeout=10).status_code == 200
        reply = httpx.post(_url(replicated), json=CHAT, timeout=120)
        assert reply.status_code == 200, reply.text
        client = httpclient.InferenceServerClient(f"127.0.0.1:{replicated.nginx_port}", network_timeout=120)
        assert text_of(client.infer("llava", inputs(httpclient, "Still there?", png, max_tokens=4, **GREEDY)))
    deadline = time.monotonic() + 180  # supervisord brings it back
    while not _ready(replicated.replicas()[1]):
        assert time.monotonic() < deadline, "replica 1 did not come back"
        time.sleep(2)


def test_one_replica_stopped_under_load_loses_no_chat(replicated):
    """A replica stopped on purpose (SIGTERM, as in a rolling restart): Triton refuses new
    requests while it finishes the others; the service sends those streams to the other
    replica before their first token (TRITON_RETRIES), so no chat fails."""
    supervisor = Supervisor(Path(replicated.run_dir))
    deadline = time.monotonic() + 180
    while not all(_ready(r) for r in replicated.replicas()):  # after the test above
        assert time.monotonic() < deadline, "the replicas are not both ready"
        time.sleep(2)
    stop = threading.Event()
    statuses: list[int] = []
    kserve: list[int] = []
    infer_url = f"http://127.0.0.1:{replicated.nginx_port}/v2/models/llava/infer"

    def chat_until_stopped() -> None:
        while not stop.is_set():
            statuses.append(httpx.post(_url(replicated), json=CHAT, timeout=120).status_code)

    def infer_until_stopped() -> None:  # KServe through nginx: it tries the next replica
        while not stop.is_set():
            reply = httpx.post(infer_url, json=KSERVE, timeout=120)
            kserve.append(reply.status_code)
            if reply.status_code != 200:
                (ARTIFACTS / "replica-stop-kserve-failure.txt").write_text(reply.text)

    threads = [threading.Thread(target=chat_until_stopped) for _ in range(3)]
    threads += [threading.Thread(target=infer_until_stopped) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        supervisor.rpc().stopProcess("triton-1", True)  # SIGTERM; waits until it has exited
        assert supervisor.info("triton-1")["exitstatus"] == 0, "a replica asked to stop did not exit cleanly"
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        supervisor.start_program("triton-1")
    assert statuses and set(statuses) == {200}, Counter(statuses)
    assert kserve and set(kserve) == {200}, Counter(kserve)
    deadline = time.monotonic() + 180
    while not _ready(replicated.replicas()[1]):
        assert time.monotonic() < deadline, "replica 1 did not come back"
        time.sleep(2)


def _ready(replica) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{replica.health_port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _url(stack: StackConfig) -> str:
    return f"http://127.0.0.1:{stack.nginx_port}/v1/chat/completions"
