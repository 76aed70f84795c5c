"""The stack as local processes (no Docker): tritonserver, uvicorn, nginx, Prometheus.

Every service runs detached with a PID file and a log under ``.run/``; ``up`` returns once
each service and model is ready. The nginx and Prometheus configs are the ones Compose
mounts, rendered for 127.0.0.1 ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlm_stack.config import ROOT, StackConfig
from vlm_stack.procs import uvicorn_command
from vlm_stack.render import render
from vlm_triton import launch

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]


@dataclass
class Service:
    name: str
    command: list[str]
    health_url: str | None
    required: bool = True
    env: dict[str, str] | None = None


def say(message: str) -> None:
    print(f"[stack {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check_port_privilege(port: int, euid: int) -> None:
    """Ports below 1024 need root: say so, and offer another."""
    if port < 1024 and euid != 0:
        raise SystemExit(f"port {port} needs root; run as root or choose another, e.g. NGINX_PORT=8088 make up")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError):
        return False


class LocalStack:
    def __init__(self, config: StackConfig):
        self.c = config
        self.run = config.run_dir
        self.logs = self.run / "logs"
        self.pids = self.run / "pids"

    # -- what runs ---------------------------------------------------------------------
    def services(self) -> list[Service]:
        c = self.c
        triton_env = launch.environment({**c.env, "TRITON_ADDRESS": "127.0.0.1"})
        if c.models_dir:
            triton_env["VLM_MODELS_DIR"] = c.models_dir
        api_env = {
            **c.env,
            "TRITON_GRPC_URL": f"127.0.0.1:{c.triton_grpc_port}",
            "HISTORY_DB": c.env.get("HISTORY_DB", str(self.run / "data" / "history.sqlite3")),
            "MAX_BODY_BYTES": str(c.max_body_bytes()),
        }
        services = [
            Service(
                "triton",
                launch.command(
                    http_port=c.triton_http_port,
                    grpc_port=c.triton_grpc_port,
                    metrics_port=c.triton_metrics_port,
                    address="127.0.0.1",
                ),
                f"http://127.0.0.1:{c.triton_http_port}/v2/health/ready",
                env=triton_env,
            ),
            Service(
                "fastapi",
                uvicorn_command(c.api_port),
                f"http://127.0.0.1:{c.api_port}/health/ready",
                env=api_env,
            ),
        ]
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx:
            services.append(
                Service(
                    "nginx",
                    [
                        nginx,
                        "-p",
                        str(self.run / "nginx"),
                        "-c",
                        str(self.run / "nginx" / "nginx.conf"),
                        "-g",
                        "daemon off;",
                    ],
                    f"http://127.0.0.1:{c.nginx_port}/health",
                    required=False,
                )
            )
        exporter = shutil.which("prometheus-nginx-exporter") or shutil.which("nginx-prometheus-exporter")
        if nginx and exporter:
            services.append(
                Service(
                    "nginx-exporter",
                    [
                        exporter,
                        f"-nginx.scrape-uri=http://127.0.0.1:{c.nginx_status_port}/stub_status",
                        f"-web.listen-address=127.0.0.1:{c.exporter_port}",
                    ],
                    f"http://127.0.0.1:{c.exporter_port}/metrics",
                    required=False,
                )
            )
        prometheus = shutil.which("prometheus")
        if prometheus:
            services.append(
                Service(
                    "prometheus",
                    [
                        prometheus,
                        f"--config.file={self.run / 'prometheus' / 'prometheus.yml'}",
                        f"--storage.tsdb.path={self.run / 'prometheus' / 'data'}",
                        f"--web.listen-address=127.0.0.1:{c.prometheus_port}",
                    ],
                    f"http://127.0.0.1:{c.prometheus_port}/-/ready",
                    required=False,
                )
            )
        return services

    def missing(self) -> list[str]:
        lines = []
        try:
            launch.binary()
        except SystemExit:
            lines.append("tritonserver (run `make install`)")
        if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
            lines.append(
                f"nginx (apt-get install nginx): no gateway on port {self.c.nginx_port}; use the services' own ports"
            )
        if not shutil.which("prometheus"):
            lines.append("prometheus (apt-get install prometheus): no metrics collection")
        if not (shutil.which("prometheus-nginx-exporter") or shutil.which("nginx-prometheus-exporter")):
            lines.append("prometheus-nginx-exporter (apt-get install prometheus-nginx-exporter): no nginx metrics")
        return lines

    # -- configs -------------------------------------------------------------------------
    def write_configs(self) -> None:
        nginx_dir = self.run / "nginx"
        for sub in ("temp/client_body", "temp/proxy", "temp/fastcgi", "temp/uwsgi", "temp/scgi", "logs"):
            (nginx_dir / sub).mkdir(parents=True, exist_ok=True)
        body = render((ROOT / "nginx" / "templates" / "vlm.conf.template").read_text(), self.c.nginx_vars())
        (nginx_dir / "vlm.conf").write_text(body)
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = nginx_dir / "temp"
        (nginx_dir / "nginx.conf").write_text(
            f"{user}worker_processes 2;\npid {nginx_dir / 'nginx.pid'};\n"
            f"error_log {self.logs / 'nginx-error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  include /etc/nginx/mime.types;\n  default_type application/octet-stream;\n"
            f"  client_body_temp_path {temp / 'client_body'};\n  proxy_temp_path {temp / 'proxy'};\n"
            f"  fastcgi_temp_path {temp / 'fastcgi'};\n  uwsgi_temp_path {temp / 'uwsgi'};\n"
            f"  scgi_temp_path {temp / 'scgi'};\n  include {nginx_dir / 'vlm.conf'};\n}}\n"
        )
        prom = self.run / "prometheus"
        if prom.exists():
            shutil.rmtree(prom / "rules", ignore_errors=True)
        (prom / "targets").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "prometheus" / "prometheus.yml", prom / "prometheus.yml")
        shutil.copytree(ROOT / "prometheus" / "rules", prom / "rules")
        c = self.c
        targets = [
            {"targets": [f"127.0.0.1:{c.triton_metrics_port}"], "labels": {"job_name": "triton"}},
            {"targets": [f"127.0.0.1:{c.api_port}"], "labels": {"job_name": "fastapi"}},
            {"targets": [f"127.0.0.1:{c.prometheus_port}"], "labels": {"job_name": "prometheus"}},
        ]
        if any(s.name == "nginx-exporter" for s in self.services()):
            targets.append({"targets": [f"127.0.0.1:{c.exporter_port}"], "labels": {"job_name": "nginx"}})
        (prom / "targets" / "local.json").write_text(json.dumps(targets, indent=1))

    # -- processes -----------------------------------------------------------------------
    def pid(self, name: str) -> int | None:
        path = self.pids / f"{name}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text())
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (ProcessLookupError, FileNotFoundError):
            return None
        return None if state == "Z" else pid  # an exited child not yet reaped counts as stopped

    def start(self, service: Service) -> None:
        if self.pid(service.name):
            say(f"{service.name} already running (pid {self.pid(service.name)})")
            return
        log = (self.logs / f"{service.name}.log").open("ab")
        process = subprocess.Popen(
            service.command,
            cwd=ROOT,
            env=service.env or self.c.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (self.pids / f"{service.name}.pid").write_text(str(process.pid))
        say(f"{service.name} started (pid {process.pid}, log {self.logs / (service.name + '.log')})")

    def wait(self, service: Service, timeout_s: float, extra: Callable[[], str | None] | None = None) -> None:
        start = time.monotonic()
        last = 0.0
        while True:
            if not self.pid(service.name):
                tail = (self.logs / f"{service.name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"{service.name} exited during start-up; last log lines:\n{tail}")
            if service.health_url is None or http_ok(service.health_url):
                say(f"{service.name} ready after {time.monotonic() - start:.1f}s")
                return
            waited = time.monotonic() - start
            if waited > timeout_s:
                raise SystemExit(f"{service.name} not ready after {timeout_s:.0f}s; see {self.logs / service.name}.log")
            if waited - last >= 5:
                detail = extra() if extra else None
                say(f"waiting for {service.name} ({waited:.0f}s){': ' + detail if detail else ''}")
                last = waited
            time.sleep(0.5)

    def model_states(self) -> dict[str, bool]:
        base = f"http://127.0.0.1:{self.c.triton_http_port}/v2/models"
        return {m: http_ok(f"{base}/{m}/ready") and http_ok(f"{base}/{m}_stream/ready") for m in MODELS}

    def _models_progress(self) -> str:
        states = self.model_states()
        return f"models ready {sum(states.values())}/{len(states)}"

    def up(self, timeout_s: float = 900) -> None:
        for line in self.missing():
            say(f"missing: {line}")
        if any(line.startswith("tritonserver") for line in self.missing()):
            raise SystemExit("cannot start without tritonserver: run `make install`")
        check_port_privilege(self.c.nginx_port, os.geteuid())
        for folder in (self.logs, self.pids, self.run / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        self.write_configs()
        nginx_check = [s for s in self.services() if s.name == "nginx"]
        if nginx_check:
            test = subprocess.run([*nginx_check[0].command[:5], "-t"], capture_output=True, text=True)
            if test.returncode != 0:
                raise SystemExit(f"nginx config test failed:\n{test.stderr}")
        for service in self.services():
            self.start(service)
            extra = self._models_progress if service.name == "triton" else None
            self.wait(service, timeout_s, extra)
        self.print_urls()

    def down(self) -> None:
        for service in reversed(self.services()):
            pid = self.pid(service.name)
            if pid is None:
                (self.pids / f"{service.name}.pid").unlink(missing_ok=True)
                continue
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while self.pid(service.name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.pid(service.name):
                os.killpg(pid, signal.SIGKILL)
            (self.pids / f"{service.name}.pid").unlink(missing_ok=True)
            say(f"{service.name} stopped")

    def status(self) -> bool:
        ok = True
        for service in self.services():
            pid = self.pid(service.name)
            healthy = bool(pid) and (service.health_url is None or http_ok(service.health_url))
            ok &= healthy or not service.required
            state = "ready" if healthy else ("starting/unhealthy" if pid else "stopped")
            print(f"{service.name:15} {state:18} {f'pid {pid}' if pid else ''}")
        if self.pid("triton"):
            for model, ready in self.model_states().items():
                ok &= ready
                print(f"  model {model:10} {'ready' if ready else 'NOT ready'}")
        return ok

    def logs_tail(self, lines: int = 40) -> None:
        for path in sorted(self.logs.glob("*.log")):
            print(f"==> {path} <==")
            print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))

    def print_urls(self) -> None:
        c = self.c
        gateway = f"http://localhost{'' if c.nginx_port == 80 else f':{c.nginx_port}'}"
        has = {s.name for s in self.services()}
        rows = [
            ("web page", f"{gateway}/" if "nginx" in has else f"http://127.0.0.1:{c.api_port}/"),
            ("OpenAI API", f"{gateway}/v1" if "nginx" in has else f"http://127.0.0.1:{c.api_port}/v1"),
            ("API docs", f"{gateway}/docs" if "nginx" in has else f"http://127.0.0.1:{c.api_port}/docs"),
            (
                "Triton HTTP (KServe v2)",
                f"{gateway}/v2" if "nginx" in has else f"http://127.0.0.1:{c.triton_http_port}/v2",
            ),
            ("Triton gRPC", f"localhost:{c.nginx_grpc_port}" if "nginx" in has else f"127.0.0.1:{c.triton_grpc_port}"),
            ("Triton metrics", f"http://127.0.0.1:{c.triton_metrics_port}/metrics"),
        ]
        if "prometheus" in has:
            rows.append(("Prometheus", f"http://127.0.0.1:{c.prometheus_port}"))
        print("\nvlm-serve is up (local processes):")
        for name, url in rows:
            print(f"  {name:25} {url}")
        if c.models_dir:
            print(
                f"\nServing the checkpoints in {c.models_dir}"
                f"{' (tiny random weights: answers are gibberish)' if 'tiny' in c.models_dir else ''}."
            )
        print("Stop it with `make down`; `make status`, `make logs`.")
