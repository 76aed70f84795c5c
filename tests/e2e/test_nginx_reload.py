"""nginx reloads while POSTs flow: none is lost.

In Swarm the nginx image rewrites its upstreams and reloads whenever a Triton replica moves
(docker/nginx/entrypoint.sh). A reload makes the old workers close their idle connections at
once; a request sent on such a connection at that moment got nginx's 502 (a 503 to the client)
and, being a POST, was not retried: CI lost one chat in about 17,000 during a rolling update.
This reloads the project's nginx config 150 times under load from six threads, with a
trivial backend in place of the service, and expects every request answered by the backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from vlm_stack.config import StackConfig
from vlm_stack.local import LocalStack
from vlm_stack.procs import free_ports

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"  # as the local stack finds it
RELOADS = 150
THREADS = 6

BACKEND = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"from": "backend"}'})
"""


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s"
            time.sleep(0.1)


@pytest.fixture
def gateway(tmp_path):
    """The project's nginx config in front of a backend that answers every request with 200."""
    nginx_port, grpc_port, status_port, api_port, triton_port = free_ports(5)
    env = {
        "NGINX_PORT": str(nginx_port),
        "NGINX_GRPC_PORT": str(grpc_port),
        "NGINX_STATUS_PORT": str(status_port),
        "API_PORT": str(api_port),
        "TRITON_HTTP_PORT": str(api_port),  # /v2 goes to the same backend
        "TRITON_GRPC_PORT": str(triton_port),
        "NGINX_RATE": "100000",
        "NGINX_BURST": "100000",
    }
    assert Path(NGINX).exists(), "nginx is a test dependency: scripts/system_packages.sh --tests installs it"
    config = StackConfig.from_env(env)
    config.run_dir = tmp_path
    stack = LocalStack(config)
    stack.logs.mkdir(parents=True, exist_ok=True)
    stack.write_configs()
    (tmp_path / "backend.py").write_text(BACKEND)
    conf = str(tmp_path / "nginx" / "nginx.conf")
    uvicorn = [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp_path), "--port", str(api_port)]
    backend = subprocess.Popen([*uvicorn, "--log-level", "warning", "backend:app"])
    nginx = subprocess.Popen([NGINX, "-c", conf, "-g", "daemon off;"])
    try:
        wait_for(f"http://127.0.0.1:{api_port}/")
        wait_for(f"http://127.0.0.1:{nginx_port}/")
        yield f"http://127.0.0.1:{nginx_port}", conf
    finally:
        for process in (nginx, backend):
            process.terminate()
            process.wait(timeout=30)


def test_no_post_is_lost_while_nginx_reloads(gateway):
    url, conf = gateway
    paths = ["/v1/chat/completions", "/api/chat", "/v2/models/llava/infer"]  # each through the admission hop
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    failures: list[str] = []

    def post(path: str) -> None:
        while not stop.is_set():
            request = urllib.request.Request(url + path, b"{}", {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as reply:
                    ok = reply.status == 200 and reply.read() == b'{"from": "backend"}'
                    outcomes["ok" if ok else "wrong"] += 1
            except urllib.error.HTTPError as exc:
                outcomes["failed"] += 1
                failures.append(f"{path}: {exc.code} {exc.read()[:120]!r}")
            except OSError as exc:
                outcomes["failed"] += 1
                failures.append(f"{path}: {exc!r}")

    threads = [threading.Thread(target=post, args=(paths[i % len(paths)],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(RELOADS):
            before = outcomes.total()
            subprocess.run([NGINX, "-c", conf, "-s", "reload"], check=True, capture_output=True)
            stalled = time.monotonic() + 60  # a gateway that stopped answering fails, not hangs
            while outcomes.total() < before + THREADS * 4:  # requests flow across each reload
                assert time.monotonic() < stalled, f"no requests answered for 60 s after a reload: {dict(outcomes)}"
                time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert outcomes["failed"] == outcomes["wrong"] == 0, (dict(outcomes), failures[:5])
    assert outcomes["ok"] >= RELOADS * THREADS * 4
