"""Shared fixtures: tiny checkpoints, test images, free ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vlm_engine.tiny.samples import sample_image as image_bytes
from vlm_stack.procs import ephemeral_stack_env, free_ports
from vlm_triton.launch import TritonProcess

__all__ = ["free_ports", "image_bytes"]

# Tests never reach a model hub: everything loads from local folders.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interrupted(signum: int, frame: object) -> None:
    """SIGTERM / SIGHUP end the run as Ctrl-C does: pytest unwinds and every fixture's
    teardown stops the servers it started (by default the signal kills pytest at once and
    leaves tritonservers, services and input workers running with no parent)."""
    raise KeyboardInterrupt(f"stopped by signal {signum}")


for _signal in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_signal, _interrupted)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
ARTIFACTS.mkdir(exist_ok=True)  # logs of the servers tests start


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    """The tiny checkpoints (``make tiny-models``), built here if they are missing."""
    from vlm_engine.tiny.build import main as build

    path = Path(os.environ.get("VLM_MODELS_DIR", ROOT / ".models" / "tiny"))
    build(["--out", str(path)])
    return path


@pytest.fixture(scope="session")
def png() -> bytes:
    return image_bytes((160, 120), "PNG")


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    return image_bytes((97, 211), "JPEG", (20, 120, 220))


# Small limits so that the limit checks are cheap to exercise; they are settings like any other.
# STREAM_GAP_MS=0: every token its own response, so the streaming tests see real chunks from
# these fast tiny models (the gap has its own test, test_stream_gap_coalesces_a_fast_rows_text)
TRITON_ENV = {"MAX_IMAGE_PIXELS": "1000000", "MAX_PROMPT_TOKENS": "512", "MAX_TOKENS_CAP": "64", "STREAM_GAP_MS": "0"}


def start_triton(
    models_dir: Path, log_name: str, models: list[str] | None = None, env: dict[str, str] | None = None, **ports
) -> TritonProcess:
    """A real tritonserver on 127.0.0.1 serving triton_models/ with the tiny checkpoints."""
    http, grpc, metrics = free_ports(3)
    ports = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics, **ports}
    server = TritonProcess(
        ARTIFACTS / log_name,
        env={"VLM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", **TRITON_ENV, **(env or {})},
        models=models,
        **ports,
    ).start()
    try:
        server.wait_ready(timeout_s=300)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def triton(tiny_models_dir):
    server = start_triton(tiny_models_dir, "tritonserver.log")
    yield server
    server.stop()


# -- the whole stack through nginx: the local runner by default, or a stack that is already
# up (Compose) when E2E_STACK_URL, E2E_PROMETHEUS_URL and E2E_GRPC_URL are set.


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


def _up(env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """``./triton_start.sh up``, its output kept in ``log``. When it fails, or the test is stopped
    while it waits (pytest's timeout), ``down`` stops what it started: a stack that never got
    ready is not left running (restarting its processes) behind the failed test."""
    try:
        up = _run("up", env)
    except BaseException:
        _run("down", env)
        raise
    log.write_text(up.stdout + up.stderr)
    if up.returncode != 0:
        _run("down", env)
    return up


def _docker_daemon_here() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def foreign_stub(directory: Path, mark: str | None) -> subprocess.Popen:
    """A process that looks like a Python-backend stub whose server is gone (its command line
    names ``triton_python_backend_stub`` and a dead parent pid), started by someone else: no
    mark of this stack, or another stack's mark. Stub clean-up must leave it alone."""
    from vlm_triton import launch
    from vlm_triton.serve import STUB

    env = {k: v for k, v in os.environ.items() if k != launch.MARKER}
    if mark is not None:
        env[launch.MARKER] = mark
    args = [str(directory / STUB), "-c", "import time; time.sleep(3600)", "model", "1", "999999"]
    return subprocess.Popen(args, executable=sys.executable, env=env)


FOREIGN_STUBS: list[subprocess.Popen] = []  # started before the stack, checked after it stopped


@pytest.fixture(scope="session")
def stack(tiny_models_dir):
    if os.environ.get("E2E_STACK_URL"):
        yield Stack(os.environ["E2E_STACK_URL"], os.environ["E2E_PROMETHEUS_URL"], os.environ["E2E_GRPC_URL"])
        return
    run_dir = ARTIFACTS / "stack"
    env = ephemeral_stack_env(run_dir, tiny_models_dir)
    env["MAX_TOKENS_CAP"] = TRITON_ENV["MAX_TOKENS_CAP"]  # the API's maximum: keeps fuzzed requests short
    # moondream2 streams every token (test_generate_stream_arrives_over_time checks that nginx
    # passes each on at once); the other models keep the default STREAM_GAP_MS
    env["MOONDREAM2_STREAM_GAP_MS"] = "0"
    if _docker_daemon_here():  # this suite is about the local stack; Compose has its own
        env["VLM_STACK_MODE"] = "local"
    FOREIGN_STUBS[:] = [foreign_stub(ARTIFACTS, None), foreign_stub(ARTIFACTS, "another-deployment")]
    up = _up(env, ARTIFACTS / "stack-up.log")
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
        alive = [stub.poll() is None for stub in FOREIGN_STUBS]
        for stub in FOREIGN_STUBS:
            stub.kill()
            stub.wait()
        assert all(alive), f"the stack's start or stop killed another deployment's stub-like process: {alive}"


# -- rows that never end by themselves: a tritonserver whose models write past their
# end-of-sequence (IGNORE_EOS) and may be asked for ``LONG`` tokens, more than any machine
# writes in a test's time. A test that needs a row still running when it acts uses one, ends
# it itself (cancels it) and reads what happened from the engine's own trace
# (``ROW_TRACE_FILE``), never from a timer or a gauge's timing.

LONG = 200_000  # tokens a never-ending row asks for (the tiny LLaVA writes ~750/s here)
LONG_MODELS = ["llava", "kosmos2", "qwen3-vl"]
HANG_S = 300  # only a guard against a broken build hanging the suite; no verdict depends on it


class Trace:
    """The engine's trace of ended rows (JSON lines), read by position."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def mark(self) -> float:
        """Now, on the host's monotonic clock (the engine's too): rows submitted later are new."""
        return time.monotonic()

    def wait(self, since: float, count: int = 1) -> list[dict]:
        """The first ``count`` rows submitted after ``since`` to end, in the order they ended,
        waiting for as long as that takes (the engine writes each about a second after it ends;
        rows submitted before, a model's warm-up say, are not counted)."""
        deadline = time.monotonic() + HANG_S
        while len(ended := [row for row in self.rows() if row["submitted"] >= since]) < count:
            assert time.monotonic() < deadline, f"fewer than {count} rows ended within {HANG_S} s"
            time.sleep(0.05)
        return sorted(ended, key=lambda row: row["ended"])[:count]


@pytest.fixture(scope="session")
def long_trace(tmp_path_factory) -> Trace:
    return Trace(tmp_path_factory.mktemp("trace") / "rows.jsonl")


@pytest.fixture(scope="session")
def long_triton(tiny_models_dir, long_trace):
    env = {
        "MAX_TOKENS_CAP": str(LONG),
        "IGNORE_EOS": "true",
        "KV_CACHE_TOKENS": str(LONG + 1024),  # the pool (~400 MiB a tiny model) takes a LONG row
        "STREAM_GAP_MS": "40",  # the default: heartbeats and streamed text held as in production
        "ROW_TRACE_FILE": str(long_trace.path),
    }
    models = ["llava", *(f"{m}_stream" for m in LONG_MODELS)]
    server = start_triton(tiny_models_dir, "tritonserver-long.log", models=models, env=env)
    yield server
    server.stop()
