"""``python -m vlm_triton.serve``: tritonserver, a watchdog that heals it, and a health
endpoint that tells the truth.

Triton keeps saying a Python model is ready after its stub process died (an OOM kill, a
CUDA fault): every request then fails with "Stub process ... is not healthy", and nothing
restarts the stub. This wrapper runs tritonserver in explicit model-control mode (all
models loaded at start) and watches the stub processes of every loaded model. When one
dies, that model alone is reloaded through the repository API on 127.0.0.1 (with a changed
config, which makes Triton start new instances; a plain ``load`` of a loaded model does
nothing and ``unload`` waits for the dead stub). Until it is back, ``GET /ready`` on the
health port answers 503 naming it. If tritonserver itself exits, this process exits with
its code, so that the supervisor (supervisord locally, Docker's restart policy in Compose)
starts both again.

On SIGTERM with ``TRITON_DRAIN_S`` set (rolling updates in Swarm and Kubernetes), it first
says "not ready" and goes on serving for that long, so that nginx and the service stop sending
new requests here; then tritonserver stops and finishes the requests in flight.

The health port (``TRITON_HEALTH_PORT``, 8003) and the repository API are for the stack's
inside only: nginx routes neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vlm_triton import launch

log = logging.getLogger("vlm_triton.serve")
STUB = "triton_python_backend_stub"


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if int(ppid) == pid and state not in ("Z", "X"):
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def stub_processes(server_pid: int) -> dict[int, str]:
    """Live Python-backend stubs of ``server_pid``: pid -> model name (from its model.py path)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) != server_pid or state in ("Z", "X"):
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if len(args) > 1 and args[0].decode(errors="replace").endswith(STUB):
            found[int(entry.name)] = Path(args[1].decode(errors="replace")).parent.parent.name
    return found


def process_table() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, start time in clock ticks since boot)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] not in ("Z", "X"):
                    table[int(entry.name)] = (int(fields[1]), fields[19])
            except (OSError, ValueError, IndexError):
                pass
    return table


def descendants(pid: int, table: dict[int, tuple[int, str]]) -> set[tuple[int, str]]:
    """``pid``'s children, theirs and so on, each as (pid, start time)."""
    found: set[tuple[int, str]] = set()
    parents = [pid]
    while parents:
        parent = parents.pop()
        for child, (ppid, started) in table.items():
            if ppid == parent and (child, started) not in found:
                found.add((child, started))
                parents.append(child)
    return found


def kill_left_behind(processes: set[tuple[int, str]]) -> list[int]:
    """SIGKILL those of ``processes`` still alive: a dead stub's children (vLLM's engine core
    and worker outlive a killed stub, and keep its memory). The start time must match, so a
    pid the system gave to another process since is left alone."""
    killed = []
    table = process_table()
    for pid, started in processes:
        if table.get(pid, (0, None))[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    if killed:
        log.warning("killed %d process(es) a dead stub left behind: %s", len(killed), sorted(killed))
    return killed


def kill_orphan_stubs(mark: str | None = None) -> list[int]:
    """SIGKILL this stack's stubs whose tritonserver is gone (killed with it, they may live on
    and keep their memory), and remove their shared-memory regions. A stub is this stack's
    when its environment carries ``launch.MARKER`` with this stack's mark (tritonserver got it
    from ``launch.environment``); any other process, a stub of another Triton (PyTriton, an
    embedded server, another deployment) included, is left alone. A stub's arguments name
    its server's pid (the 6th) and its region (the 3rd); a live server's stubs stay."""
    wanted = f"{launch.MARKER}={mark or launch.marker()}".encode()
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            if len(args) < 6 or not args[0].decode(errors="replace").endswith(STUB):
                continue
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue  # not started by this stack's tritonserver
            server = Path("/proc") / args[5].decode()
            if server.exists() and b"tritonserver" in (server / "cmdline").read_bytes():
                continue  # its server still runs
            children = descendants(int(entry.name), process_table())  # vLLM's engine core, input workers
            os.kill(int(entry.name), signal.SIGKILL)
            kill_left_behind(children)
        except (OSError, ValueError):
            continue
        killed.append(int(entry.name))
        Path("/dev/shm", args[2].decode(errors="replace")).unlink(missing_ok=True)
    if killed:
        log.warning("killed %d stub process(es) left behind by a dead tritonserver: %s", len(killed), killed)
    return killed


def _request(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


RETRY_S = 10.0  # a failed reload is tried again after this long


@dataclass
class ModelWatch:
    stubs: set[int] = field(default_factory=set)
    recovering: bool = False
    failed_at: float | None = None  # the last reload failed: not ready, tried again later
    reason: str = ""
    restarts: int = 0

    @property
    def ready(self) -> bool:
        return not self.recovering and self.failed_at is None


class Watchdog:
    """Notices dead stubs and reloads their model; knows what is ready."""

    def __init__(self, http_url: str, server_pid: int, reload_timeout_s: float = 900.0):
        self.base = f"http://{http_url}"
        self.server_pid = server_pid
        self.reload_timeout_s = reload_timeout_s
        self.models: dict[str, ModelWatch] = {}
        self.server_ready = False
        self.draining = False  # stopping: still serving, but no longer ready (callers move away)
        self.trees: dict[int, set[tuple[int, str]]] = {}  # each live stub's descendants, last seen
        self._lock = threading.Lock()

    def loaded_models(self) -> list[str]:
        status, body = _request(f"{self.base}/v2/repository/index", {"ready": True})
        if status != 200:
            return []
        return [m["name"] for m in json.loads(body) if m.get("state") == "READY"]

    def check(self) -> None:
        """One round: which stubs died since the last round; reload their models."""
        try:
            self.server_ready = _request(f"{self.base}/v2/health/ready", timeout=2)[0] == 200
            loaded = self.loaded_models() if self.server_ready else []
        except OSError:
            self.server_ready, loaded = False, []
        stubs = stub_processes(self.server_pid)
        self._track(stubs)
        for model in loaded:
            live = {pid for pid, name in stubs.items() if name == model}
            with self._lock:
                watch = self.models.setdefault(model, ModelWatch())
                if watch.recovering:
                    continue
                if watch.failed_at is not None:
                    if time.monotonic() - watch.failed_at < RETRY_S:
                        continue
                    dead = {0}  # try the reload again
                else:
                    dead = watch.stubs - live
                    watch.stubs = live
                if not dead:
                    continue
                watch.recovering, watch.restarts = True, watch.restarts + 1
                watch.reason = f"stub process {', '.join(map(str, sorted(dead)))} died; reloading"
            log.warning("model %s: stub process %s died; reloading it", model, ", ".join(map(str, sorted(dead))))
            threading.Thread(target=self._reload, args=(model,), name=f"reload-{model}", daemon=True).start()

    def _track(self, stubs: dict[int, str]) -> None:
        """Note each live stub's descendants; kill those a stub that died left behind."""
        table = process_table()
        for stub in list(self.trees):
            if stub not in stubs:
                kill_left_behind(self.trees.pop(stub))
        for stub in stubs:
            self.trees[stub] = descendants(stub, table)

    def kill_left_behind(self) -> None:
        """tritonserver has exited: what its stubs started goes too."""
        for stub in list(self.trees):
            kill_left_behind(self.trees.pop(stub))

    def _reload(self, model: str) -> None:
        started = time.monotonic()
        try:
            status, body = _request(f"{self.base}/v2/models/{model}/config")
            config = json.loads(body)
            config.setdefault("parameters", {})["reloaded_at"] = {"string_value": f"{time.time():.3f}"}
            status, body = _request(
                f"{self.base}/v2/repository/models/{model}/load",
                {"parameters": {"config": json.dumps(config)}},
                timeout=self.reload_timeout_s,
            )
            if status != 200:
                raise RuntimeError(body.decode(errors="replace")[:300])
            log.warning("model %s: reloaded in %.1f s", model, time.monotonic() - started)
            with self._lock:
                watch = self.models[model]
                watch.stubs = {pid for pid, name in stub_processes(self.server_pid).items() if name == model}
                watch.recovering, watch.failed_at, watch.reason = False, None, ""
        except Exception as exc:  # stays not ready; tried again after RETRY_S
            log.error("model %s: reload failed (tried again in %.0f s): %s", model, RETRY_S, exc)
            with self._lock:
                watch = self.models[model]
                watch.recovering, watch.failed_at, watch.reason = False, time.monotonic(), f"reload failed: {exc}"

    def state(self) -> dict:
        with self._lock:
            models = {
                name: {"ready": w.ready and self.server_ready, "restarts": w.restarts, "reason": w.reason}
                for name, w in sorted(self.models.items())
            }
        if self.draining:
            for state in models.values():
                state.update(ready=False, reason="the server is stopping")
        not_ready = [name for name, m in models.items() if not m["ready"]]
        ready = self.server_ready and not not_ready and not self.draining
        return {"ready": ready, "not_ready": not_ready, "models": models}


def health_server(watchdog: Watchdog, address: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the http.server API
            if self.path not in ("/ready", "/models"):
                self.send_error(404)
                return
            state = watchdog.state()
            body = json.dumps(state).encode()
            self.send_response(200 if state["ready"] or self.path == "/models" else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds: keep the log quiet
            return

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # probes that hang up early are normal
                super().handle_error(request, client_address)

    server = Server((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=launch.ROOT / "triton_models")
    parser.add_argument("--http-port", type=int, default=int(env.get("TRITON_HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(env.get("TRITON_GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(env.get("TRITON_METRICS_PORT", 8002)))
    parser.add_argument("--health-port", type=int, default=int(env.get("TRITON_HEALTH_PORT", 8003)))
    parser.add_argument("--interval", type=float, default=float(env.get("WATCHDOG_INTERVAL_S", 1.0)))
    parser.add_argument("--model", action="append", dest="models", help="load only these (default: all)")
    args, extra = parser.parse_known_args(argv)
    address = env.get("TRITON_ADDRESS", "127.0.0.1")
    server_env = launch.environment()
    cmd = launch.command(
        args.model_repository,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        args.models or ["*"],
        extra=extra,
        env=env,
    )
    print(" ".join(cmd), flush=True)
    kill_orphan_stubs()  # a previous server of this stack may have died with its stubs running
    server = subprocess.Popen(cmd, env=server_env)
    stopping = threading.Event()

    drain_s = float(env.get("TRITON_DRAIN_S", 0))

    def stop(signum: int, _frame) -> None:
        if stopping.is_set() or drain_s <= 0:  # a second signal does not wait
            stopping.set()
            server.send_signal(signum)
            return
        stopping.set()
        watchdog.draining = True
        log.warning("stopping: not ready now, still serving for %.0f s (TRITON_DRAIN_S), then tritonserver", drain_s)
        threading.Timer(drain_s, server.send_signal, (signum,)).start()

    watchdog = Watchdog(f"127.0.0.1:{args.http_port}", server.pid)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    health_server(watchdog, address, args.health_port)
    while server.poll() is None:
        watchdog.check()
        time.sleep(args.interval)
    kill_orphan_stubs()
    watchdog.kill_left_behind()
    if stopping.is_set():
        return 0
    log.error("tritonserver exited with %s: leaving so that the supervisor starts it again", server.returncode)
    return server.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
