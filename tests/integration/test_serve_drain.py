"""vlm_triton.serve stopping gently (``TRITON_DRAIN_S``, set by the Swarm stack and the Helm
chart): on SIGTERM its health endpoint says "not ready" at once, Triton goes on answering for
the drain time, then stops; the process exits 0.

It asks the stream model (where the weights and the batching live) through KServe
``generate``: the KServe facade's stub can die on its own under threaded BLS (a known Triton
bug, docs/ARCHITECTURE.md), which is not what this test is about."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import ARTIFACTS, TRITON_ENV, free_ports
from vlm_triton import launch

DRAIN_S = 8  # far longer than the few requests sent while draining


def test_sigterm_drains_then_stops(tiny_models_dir):
    http, grpc, metrics, health = free_ports(4)
    env = launch.environment(
        {
            **os.environ,
            **TRITON_ENV,
            "VLM_MODELS_DIR": str(tiny_models_dir),
            "HF_HUB_OFFLINE": "1",
            "TRITON_DRAIN_S": str(DRAIN_S),
        }
    )
    command = [sys.executable, "-m", "vlm_triton.serve", "--model", "llava_stream"]
    command += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}", f"--health-port={health}"]
    with (ARTIFACTS / "serve-drain.log").open("wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _ready(health) != 200:
            assert server.poll() is None and time.monotonic() < deadline, "vlm_triton.serve did not become ready"
            time.sleep(1)
        generate = f"http://127.0.0.1:{http}/v2/models/llava_stream/generate"
        body = {"prompt": "Still here?", "max_tokens": 4, "temperature": 0.0, "stream": False}

        server.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        while (state := httpx.get(f"http://127.0.0.1:{health}/ready", timeout=5)).status_code != 503:
            assert time.monotonic() - stopped_at < DRAIN_S, "the health endpoint never said not ready while draining"
        assert state.json()["models"]["llava_stream"]["reason"] == "the server is stopping"
        for _ in range(3):  # still serving meanwhile (a few requests: no race with the drain's end)
            reply = httpx.post(generate, json=body, timeout=60)
            assert reply.status_code == 200 and reply.json()["output_tokens"] >= 1, reply.text
        assert server.poll() is None
        assert server.wait(timeout=60) == 0
        assert time.monotonic() - stopped_at >= DRAIN_S
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _ready(port: int) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code
    except httpx.HTTPError:
        return 0
