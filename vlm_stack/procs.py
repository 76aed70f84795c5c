"""Child processes of the stack: free ports, the uvicorn command, waiting for health."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vlm_stack.config import PORT_NAMES, ROOT

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 20000
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to ``bind(0)`` and outgoing connections (Linux's default
    where the file cannot be read)."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    """Nothing listens on ``port`` on any address (bound on every address, so a listener on
    127.0.0.1 or 0.0.0.0 both count)."""
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, chosen below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in the ephemeral range, where the kernel may give it to any
    process's next ``bind(0)`` or outgoing connection before the service we chose it for binds
    it (seen: vLLM's engine core took nginx's chosen port while Triton loaded). Ports below the
    range are never handed out by the kernel; this process never hands one out twice, and a
    random start keeps two processes choosing at once apart."""
    low, _ = ephemeral_range()
    if low - LOWEST_CHOSEN_PORT < 4 * count:  # an unusual range: fall back on the kernel
        return _kernel_ports(count)
    span = low - LOWEST_CHOSEN_PORT
    start = random.randrange(span)
    found: list[int] = []
    for offset in range(span):
        port = LOWEST_CHOSEN_PORT + (start + offset) % span
        if port not in _handed_out and _bindable(port):
            found.append(port)
            _handed_out.add(port)
            if len(found) == count:
                return found
    raise RuntimeError(f"no {count} free ports between {LOWEST_CHOSEN_PORT} and {low}")


def _kernel_ports(count: int) -> list[int]:
    """``count`` distinct ports from the kernel: all stay bound until all are chosen."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def ephemeral_stack_env(run_dir: Path, models_dir: Path) -> dict[str, str]:
    """Environment for a local stack on free 127.0.0.1 ports (tests, benchmarks, load tests)."""
    ports = iter(free_ports(len(PORT_NAMES) + 3 * 4))
    return {
        **os.environ,
        **{name: str(next(ports)) for name in PORT_NAMES},
        # ports for up to three more Triton replicas (TRITON_REPLICAS), free ones too
        "TRITON_REPLICA_PORTS": ",".join(":".join(str(next(ports)) for _ in range(4)) for _ in range(3)),
        "NGINX_LOCAL_ONLY": "1",
        "STACK_RUN_DIR": str(run_dir),
        "VLM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
        "HISTORY_DB": str(run_dir / "data" / "history.sqlite3"),
        "PYTHON": sys.executable,
        # tests and benchmarks drive the gateway hard from one address: per-client limits
        # out of their way (tests/e2e/test_access.py checks the limits with small ones)
        "NGINX_RATE": "10000",
        "NGINX_BURST": "10000",
        "NGINX_CONNECTIONS": "10000",
    }


UVICORN_LOGGING = ROOT / "fastapi_app" / "logging.json"
# How long the service keeps an idle connection open: longer than nginx keeps its idle
# connections to the service (keepalive_timeout 30s in nginx/templates/vlm.conf.template), so
# that nginx, not the service, closes them. uvicorn's default, 5 s, raced nginx's reuse of a
# connection: a chat sent on it as the service closed it came back as a 502 (seen in CI).
# docker/Dockerfile.fastapi and `make api` pass the same value.
SERVICE_KEEP_ALIVE_S = 75


def uvicorn_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The FastAPI service, the way every launcher starts it: uvicorn's access log off (the
    service logs a line per request itself, fastapi_app/middleware.py; health probes and
    scrapes left out), timestamps on every line (fastapi_app/logging.json), idle connections
    kept for ``SERVICE_KEEP_ALIVE_S``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "fastapi_app.main:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        "--log-config",
        str(UVICORN_LOGGING),
        "--timeout-keep-alive",
        str(SERVICE_KEEP_ALIVE_S),
    ]


class ApiProcess:
    """The FastAPI service as a child process with its own environment and log."""

    def __init__(self, log_path: Path, env: dict[str, str], port: int | None = None):
        self.log_path, self.port = Path(log_path), port or free_port()
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180, until: str = "/health/ready") -> ApiProcess:
        """Start it and wait until ``until`` answers 200 (``/health``: up, whatever Triton says)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            uvicorn_command(self.port), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + until, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the service was not ready in {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
