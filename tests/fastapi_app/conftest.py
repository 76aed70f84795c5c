"""The FastAPI service as a real uvicorn process on 127.0.0.1, against a real tritonserver."""

from __future__ import annotations

import pytest

from tests.conftest import ARTIFACTS, TRITON_ENV
from vlm_stack import procs

MAX_BODY_BYTES = 3_000_000


class ApiProcess(procs.ApiProcess):
    """The service under test; its log goes to artifacts/<name>.log."""

    def __init__(self, name: str, env: dict[str, str], port: int | None = None):
        super().__init__(ARTIFACTS / f"{name}.log", env, port)
        self.name = name


def api_env(tmp_path_factory, **extra) -> dict[str, str]:
    db = tmp_path_factory.mktemp("history") / "history.sqlite3"
    return {
        "HISTORY_DB": str(db),
        "MAX_HISTORY": "3",
        "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "MAX_TOKENS_CAP": TRITON_ENV["MAX_TOKENS_CAP"],
        **extra,
    }


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
