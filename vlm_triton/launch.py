"""Start a real ``tritonserver`` (from the nvidia-pytriton wheel) on this repository.

``python -m vlm_triton.launch`` runs it in the foreground; tests and the local stack use
``command()`` and ``environment()``. The server's Python stubs import this repository and
this interpreter's site-packages (torch, transformers) through ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from vlm_engine.preparing import PYTHON_ENV

ROOT = Path(__file__).resolve().parent.parent
TRITON_HOME = Path(os.environ.get("TRITON_HOME", ROOT / ".triton"))


def server_dir() -> Path:
    return TRITON_HOME / "unpacked" / "pytriton" / "tritonserver"


def binary() -> Path:
    """The tritonserver binary: $TRITON_HOME's, else one on PATH (e.g. the NGC image)."""
    local = server_dir() / "bin" / "tritonserver"
    if local.exists():
        return local
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise SystemExit("tritonserver not found: run `make install` (scripts/install_triton.sh)")


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def python_libdir() -> str | None:
    """This interpreter's shared libpython folder, so the stub runs the same Python.

    The stub links ``libpython3.X.so.1.0``; if it found another installation's (Debian's,
    say) it would mix that interpreter with this one's standard library and packages.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).exists():
        return libdir
    return None


# Set in tritonserver's environment, so in its stubs': how the stack knows its own stubs
# (vlm_triton.serve.kill_orphan_stubs) without matching any other process by name.
MARKER = "VLM_SERVE_STUB_OWNER"


def marker() -> str:
    """This stack's mark: its model repository's checkout."""
    return f"vlm-serve:{ROOT}"


# what a process needs from the machine whatever else it is given: compilers (the CPU attention
# kernel, torch.compile's C++) find themselves and their tools through PATH
MACHINE_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """tritonserver's environment: ``base`` (default: this process's), with the machine's
    ``MACHINE_VARIABLES`` where ``base`` lacks them, and what the stubs need."""
    env = dict(os.environ if base is None else base)
    for name in MACHINE_VARIABLES:
        if name not in env and name in os.environ:
            env[name] = os.environ[name]
    env[MARKER] = marker()
    libs = TRITON_HOME / "unpacked" / "nvidia_pytriton.libs"
    ld_path = [python_libdir(), str(libs) if libs.exists() else None, env.get("LD_LIBRARY_PATH")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld_path if p)
    paths = [str(ROOT), *site.getsitepackages(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("HF_HUB_OFFLINE", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault(PYTHON_ENV, sys.executable)  # the stubs' input workers run this interpreter
    return env


STREAM_GRACE_MS = 900_000  # a stream open when its connection ages out may run this long


def command(
    model_repository: Path = ROOT / "triton_models",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    models: list[str] | None = None,
    stub_timeout_s: int = 600,
    address: str = os.environ.get("TRITON_ADDRESS", "127.0.0.1"),
    extra: list[str] | None = None,
    model_config: str = os.environ.get("TRITON_MODEL_CONFIG", ""),
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The tritonserver command line for this repository; models that ``env`` (default: this
    process's) sets to ``ENGINE=vllm`` are served from a copy that runs them in vLLM's
    environment (``vlm_triton.repository``)."""
    from vlm_triton.repository import serving_repository

    model_repository = serving_repository(model_repository, env)
    cmd = [
        str(binary()),
        f"--model-repository={model_repository}",
        f"--http-address={address}",
        f"--grpc-address={address}",
        f"--metrics-address={address}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        # Large checkpoints take longer than the stub's default 30 s to load.
        f"--backend-config=python,stub-timeout-seconds={stub_timeout_s}",
        "--log-info=true",
        "--exit-timeout-secs=10",
        # Clients (the service) ping every 10 s to find a replica whose host is gone; allow it.
        "--grpc-keepalive-permit-without-calls=1",
        "--grpc-http2-min-recv-ping-interval-without-data=5000",
        # Each gRPC connection is closed gently (GOAWAY; its streams finish) after 5 s, so that
        # clients look the replicas up again: a replica that stops, or a new one, is seen within
        # seconds (gRPC's round-robin otherwise keeps its first addresses for good).
        "--grpc-max-connection-age=5000",
        f"--grpc-max-connection-age-grace={STREAM_GRACE_MS}",
    ]
    if (server_dir() / "backends").exists():
        cmd.append(f"--backend-directory={server_dir() / 'backends'}")
    if not has_gpu():
        cmd.append("--allow-gpu-metrics=false")
    if model_config:  # e.g. "gpu": configs/gpu.pbtxt where a model has one (vlm_triton.gpu_configs)
        cmd.append(f"--model-config-name={model_config}")
    if models:
        cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
    return cmd + list(extra or [])


class TritonProcess:
    """A tritonserver child process: start, wait until ready (with progress), stop by PID."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None, **command_args):
        self.env = environment(env)
        self.cmd = command(**command_args, env=self.env)
        self.http_port = command_args.get("http_port", 8000)
        self.grpc_port = command_args.get("grpc_port", 8001)
        self.metrics_port = command_args.get("metrics_port", 8002)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> TritonProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 300, progress=print) -> None:
        start = time.monotonic()
        last = 0.0
        while not self.is_ready():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}; see {self.log_path}")
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f}s; see {self.log_path}")
            if waited - last >= 10:
                progress(f"waiting for tritonserver ({waited:.0f}s, log: {self.log_path})")
                last = waited
            time.sleep(0.5)

    def stop(self, timeout_s: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run tritonserver on triton_models/")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "triton_models")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", 8002)))
    parser.add_argument("--model", action="append", dest="models", help="load only these (repeatable)")
    args, extra = parser.parse_known_args(argv)
    cmd = command(args.model_repository, args.http_port, args.grpc_port, args.metrics_port, args.models, extra=extra)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
