"""The whole stack, reached only through nginx: the local runner by default, or a stack that
is already up (Compose) when E2E_STACK_URL and E2E_PROMETHEUS_URL are set."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import ARTIFACTS, ROOT
from vlm_stack.procs import ephemeral_stack_env


@dataclass
class Stack:
    url: str  # nginx, e.g. http://127.0.0.1:18090
    prometheus_url: str
    grpc_url: str  # nginx's gRPC port, host:port

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[1]


def _run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``./triton_start.sh <command>``, exactly as a user runs it."""
    return subprocess.run(
        ["./triton_start.sh", command], cwd=ROOT, env=env, text=True, capture_output=True, timeout=900
    )


def _docker_daemon_here() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def stack(tiny_models_dir):
    if os.environ.get("E2E_STACK_URL"):
        yield Stack(os.environ["E2E_STACK_URL"], os.environ["E2E_PROMETHEUS_URL"], os.environ["E2E_GRPC_URL"])
        return
    run_dir = ARTIFACTS / "stack"
    env = ephemeral_stack_env(run_dir, tiny_models_dir)
    if _docker_daemon_here():  # this suite is about the local stack; Compose has its own
        env["VLM_STACK_MODE"] = "local"
    up = _run("up", env)
    (ARTIFACTS / "stack-up.log").write_text(up.stdout + up.stderr)
    assert up.returncode == 0, f"stack did not come up:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
    assert "[stack] mode: local" in up.stdout and "vlm-serve is up" in up.stdout
    try:
        yield Stack(
            f"http://127.0.0.1:{env['NGINX_PORT']}",
            f"http://127.0.0.1:{env['PROMETHEUS_PORT']}",
            f"127.0.0.1:{env['NGINX_GRPC_PORT']}",
        )
    finally:
        down = _run("down", env)
        status = _run("status", env)
        pids = list((run_dir / "pids").glob("*.pid"))
        assert down.returncode == 0 and not pids, f"stack not stopped: {down.stdout} {pids}"
        assert "stopped" in status.stdout and "ready " not in status.stdout.replace("NOT ready", "")
