"""The FastAPI service as a real uvicorn process on 127.0.0.1, against a real tritonserver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ARTIFACTS, ROOT, TRITON_ENV, free_port

MAX_BODY_BYTES = 3_000_000


class ApiProcess:
    """``uvicorn --factory fastapi_app.main:create_app`` with its own environment."""

    def __init__(self, name: str, env: dict[str, str], port: int | None = None):
        self.name, self.port = name, port or free_port()
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> ApiProcess:
        log = (ARTIFACTS / f"{self.name}.log").open("ab")
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "fastapi_app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        path = "/health/ready" if wait_ready else "/health"
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited; see artifacts/{self.name}.log"
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.name} not ready in 180 s; see artifacts/{self.name}.log")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def api_env(tmp_path_factory, **extra) -> dict[str, str]:
    db = tmp_path_factory.mktemp("history") / "history.sqlite3"
    return {"HISTORY_DB": str(db), "MAX_HISTORY": "3", "MAX_BODY_BYTES": str(MAX_BODY_BYTES), **extra}


@pytest.fixture(scope="session")
def api(triton, tmp_path_factory):
    """Triton backend (the default)."""
    server = ApiProcess("api-triton", api_env(tmp_path_factory, TRITON_GRPC_URL=triton.grpc_url)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local_api(tiny_models_dir, tmp_path_factory):
    """The direct path: the engine in-process; remote image URLs allowed (to test their guard)."""
    env = api_env(
        tmp_path_factory,
        INFERENCE_BACKEND="local",
        VLM_MODELS_DIR=str(tiny_models_dir),
        ALLOW_REMOTE_IMAGES="true",
        HF_HUB_OFFLINE="1",
        **TRITON_ENV,
    )
    server = ApiProcess("api-local", env).start()
    yield server
    server.stop()


@pytest.fixture(params=["api", "local_api"])
def any_api(request) -> ApiProcess:
    """Each test using this runs against both backends."""
    return request.getfixturevalue(request.param)
