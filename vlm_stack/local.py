"""The stack as local processes (no Docker): tritonserver, uvicorn, nginx, Prometheus.

supervisord (``vlm_stack.supervisor``) runs every service, with its log under
``.run/logs/``, and restarts any that dies; tritonserver runs inside ``vlm_triton.serve``,
whose watchdog reloads a model whose stub died. ``up`` starts the services in order and
returns once each service and model is ready. The nginx and Prometheus configs are the
ones Compose mounts, rendered for 127.0.0.1 ports.
"""

from __future__ import annotations

import errno
import http.client
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlm_stack import logs as stack_logs
from vlm_stack.config import ROOT, StackConfig
from vlm_stack.procs import uvicorn_command
from vlm_stack.render import render
from vlm_stack.supervisor import BACKOFF, FATAL, PasswordRefused, Program, Supervisor, new_credentials
from vlm_stack.supervisor import render as supervisord_conf
from vlm_triton import launch

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]
# How long Dynamo's router leaves out a worker it could not reach (its default, 5 s, sends a
# request to a dead worker every 5 s until discovery drops it: 5 failures in 25 s measured here)
INHIBIT_S = "30"


@dataclass
class Service:
    name: str
    command: list[str]
    health_url: str | None
    required: bool = True
    env: dict[str, str] | None = None
    ports: tuple[int, ...] = ()


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
    except (urllib.error.URLError, OSError, http.client.HTTPException):  # not HTTP/1: another server
        return False


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def port_in_use(port: int) -> bool:
    """Whether something already listens on ``port`` (on 127.0.0.1 or every address)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
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
        replicas = c.replicas()
        api_env = {
            **c.env,
            "TRITON_GRPC_URL": c.triton_grpc_target(),  # several replicas: round-robin per stream
            "HISTORY_DB": c.env.get("HISTORY_DB", str(self.run / "data" / "history.sqlite3")),
            "MAX_BODY_BYTES": str(c.max_body_bytes()),
        }
        api_env["TRITON_HEALTH_URL"] = ",".join(f"http://127.0.0.1:{r.health_port}" for r in replicas)
        if c.without_triton and c.models_dir:
            api_env["VLM_MODELS_DIR"] = c.models_dir  # the service loads the models itself
        services = [
            Service(
                replica.name,
                [
                    sys.executable,
                    "-m",
                    "vlm_triton.serve",
                    f"--http-port={replica.http_port}",
                    f"--grpc-port={replica.grpc_port}",
                    f"--metrics-port={replica.metrics_port}",
                    f"--health-port={replica.health_port}",
                ],
                f"http://127.0.0.1:{replica.health_port}/ready",
                env=triton_env,
                ports=(replica.http_port, replica.grpc_port, replica.metrics_port, replica.health_port),
            )
            for replica in replicas
        ]
        if c.dynamo:
            services += self.dynamo_services()
        services += [
            Service(
                "fastapi",
                uvicorn_command(c.api_port),
                f"http://127.0.0.1:{c.api_port}/health/ready",
                env=api_env,
                ports=(c.api_port,),
            ),
        ]
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if nginx:
            services.append(
                Service(
                    "nginx",
                    [  # a killed nginx leaves its admission socket behind; bind() would fail on it
                        "/bin/sh",
                        "-c",
                        f'rm -f {shlex.quote(c.nginx_vars()["NGINX_ADMISSION_SOCKET"])}; exec "$0" "$@"',
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
                    ports=(c.nginx_port, c.nginx_grpc_port, c.nginx_status_port),
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
                    ports=(c.exporter_port,),
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
                    ports=(c.prometheus_port,),
                )
            )
        return services

    def dynamo_services(self) -> list[Service]:
        """Dynamo's frontend and one worker per Triton replica (each forwards to its Triton)."""
        c = self.c
        env = c.dynamo_env()
        frontend = Service(
            "dynamo-frontend",
            [
                sys.executable,
                "-m",
                "dynamo.frontend",
                "--kserve-grpc-server",
                f"--http-host={c.env.get('DYNAMO_HOST', '127.0.0.1')}",
                f"--http-port={c.dynamo_grpc_port}",
                f"--grpc-metrics-port={c.dynamo_metrics_port}",
                f"--discovery-backend={env['DYN_DISCOVERY_BACKEND']}",
                f"--namespace={env['DYN_NAMESPACE']}",
                f"--router-mode={c.env.get('DYNAMO_ROUTER_MODE', 'round-robin')}",
            ],
            f"http://127.0.0.1:{c.dynamo_metrics_port}/live",
            env={
                **env,
                "DYN_RUNTIME_INHIBITED_DURATION_SECS": c.env.get("DYN_RUNTIME_INHIBITED_DURATION_SECS", INHIBIT_S),
            },
            ports=(c.dynamo_grpc_port, c.dynamo_metrics_port),
        )
        workers = [
            Service(
                "dynamo-worker" if r.index == 0 else f"dynamo-worker-{r.index}",
                [sys.executable, "-m", "vlm_dynamo.worker", f"--triton=127.0.0.1:{r.grpc_port}"],
                None,
                env={**env, "DYN_SYSTEM_PORT": str(port)},  # its /metrics and /health
                ports=(port,),
            )
            for r, port in zip(c.replicas(), c.dynamo_worker_ports(), strict=True)
        ]
        return [frontend, *workers]

    def dynamo_models(self) -> set[str]:
        """The models Dynamo's frontend lists (registered by at least one worker)."""
        try:
            url = f"http://127.0.0.1:{self.c.dynamo_metrics_port}/v1/models"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return {m["id"] for m in json.load(reply)["data"]}
        except (OSError, ValueError, KeyError):
            return set()

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
        if self.c.dynamo and not has_module("dynamo.frontend"):
            lines.append("ai-dynamo (run `make install`)")
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
        config = (ROOT / "prometheus" / "prometheus.yml").read_text()
        config = re.sub(r"  # compose-only: begin.*?# compose-only: end\n", "", config, flags=re.S)
        (prom / "prometheus.yml").write_text(config)
        shutil.copytree(ROOT / "prometheus" / "rules", prom / "rules")
        c = self.c
        targets = [
            *(
                {"targets": [f"127.0.0.1:{r.metrics_port}"], "labels": {"job_name": "triton", "replica": r.name}}
                for r in c.replicas()
            ),
            {"targets": [f"127.0.0.1:{c.api_port}"], "labels": {"job_name": "fastapi"}},
            {"targets": [f"127.0.0.1:{c.prometheus_port}"], "labels": {"job_name": "prometheus"}},
        ]
        if c.dynamo:
            targets.append({"targets": [f"127.0.0.1:{c.dynamo_metrics_port}"], "labels": {"job_name": "dynamo"}})
            for port in c.dynamo_worker_ports():
                targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {"job_name": "dynamo-worker"}})
        if any(s.name == "nginx-exporter" for s in self.services()):
            targets.append({"targets": [f"127.0.0.1:{c.exporter_port}"], "labels": {"job_name": "nginx"}})
        (prom / "targets" / "local.json").write_text(json.dumps(targets, indent=1))

    # -- processes -----------------------------------------------------------------------
    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.run)

    def pid(self, name: str) -> int | None:
        return self.supervisor.pid(name)

    def write_supervisor_config(self) -> None:
        base = self.c.env
        programs = [
            Program(
                s.name,
                s.command,
                {k: v for k, v in (s.env or {}).items() if base.get(k) != v},
                stop_seconds=60 if s.name.startswith("triton") else 20,
            )
            for s in self.services()
        ]
        supervisor = self.supervisor
        # a running supervisord keeps the password it started with (``up`` again reloads the
        # config into it); a new one gets a new password
        auth = (supervisor.credentials() if supervisor.running() else None) or new_credentials()
        supervisor.write_config(supervisord_conf(self.run, programs, ROOT, auth))

    def start(self, service: Service) -> None:
        if self.pid(service.name):
            say(f"{service.name} already running (pid {self.pid(service.name)})")
            return
        names = {port: name for name, port in self.c.listening_ports().items()}
        for port in service.ports:
            if port_in_use(port):
                raise SystemExit(
                    f"{service.name} cannot start: port {port} ({names[port]}) is in use by another process; "
                    "stop that process or give the setting another port"
                )
        self.supervisor.start_program(service.name)
        say(f"{service.name} started (pid {self.pid(service.name)}, log {self.logs / (service.name + '.log')})")

    def wait(self, service: Service, timeout_s: float, extra: Callable[[], str | None] | None = None) -> None:
        start = time.monotonic()
        last = 0.0
        while True:
            info = self.supervisor.info(service.name) or {}
            if info.get("statename") in (FATAL, BACKOFF):
                tail = (self.logs / f"{service.name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"{service.name} exited during start-up; last log lines:\n{tail}")
            if self.pid(service.name) and (service.health_url is None or http_ok(service.health_url)):
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
        """Triton's readiness, corrected by the watchdog's (it knows models whose stub died)."""
        base = f"http://127.0.0.1:{self.c.triton_http_port}/v2/models"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.c.triton_health_port}/models", timeout=2) as reply:
                healing = set(json.load(reply)["not_ready"])
        except (OSError, ValueError, KeyError):
            healing = set()
        return {
            m: http_ok(f"{base}/{m}/ready") and http_ok(f"{base}/{m}_stream/ready") and not {m, f"{m}_stream"} & healing
            for m in MODELS
        }

    def _models_progress(self) -> str:
        states = self.model_states()
        return f"models ready {sum(states.values())}/{len(states)}"

    def up(self, timeout_s: float = 900) -> None:
        for line in self.missing():
            say(f"missing: {line}")
        if not self.c.without_triton and any(line.startswith("tritonserver") for line in self.missing()):
            raise SystemExit("cannot start without tritonserver: run `make install`")
        if self.c.dynamo and self.c.without_triton:
            raise SystemExit("DYNAMO=1 puts Dynamo in front of Triton: leave INFERENCE_BACKEND unset (triton)")
        if self.c.dynamo and any(line.startswith("ai-dynamo") for line in self.missing()):
            raise SystemExit("DYNAMO=1 needs NVIDIA Dynamo: run `make install`")
        check_port_privilege(self.c.nginx_port, os.geteuid())
        self.c.check_ports()
        for folder in (self.logs, self.pids, self.run / "data"):
            folder.mkdir(parents=True, exist_ok=True)
        self.write_configs()
        self.write_supervisor_config()
        nginx_check = [s for s in self.services() if s.name == "nginx"]
        if nginx_check:
            command = nginx_check[0].command
            nginx = command[command.index("-p") - 1 :]  # past the stale-socket wrapper
            test = subprocess.run([*nginx[:5], "-t"], capture_output=True, text=True)
            if test.returncode != 0:
                raise SystemExit(f"nginx config test failed:\n{test.stderr}")
        self.supervisor.start(self.c.env, ROOT)
        say(f"supervisord running (restarts any service that dies; log {self.logs / 'supervisord.log'})")
        services = self.services()
        tritons = [s for s in services if s.name.startswith("triton")]
        for service in tritons:  # the replicas load their models at the same time
            self.start(service)
        for service in tritons:
            self.wait(service, timeout_s, self._models_progress)
        for service in services[len(tritons) :]:
            self.start(service)
            self.wait(service, timeout_s)
        if self.c.dynamo:
            self.wait_for_dynamo(timeout_s)
        if self.c.without_triton:
            say("INFERENCE_BACKEND=local: no tritonserver; the service answers KServe v2 over HTTP (/v2), not gRPC")
        self.print_urls()

    def wait_for_dynamo(self, timeout_s: float) -> None:
        """Until Dynamo's frontend lists every model of Triton's repository."""
        wanted = {p.parent.name for p in (ROOT / "triton_models").glob("*/config.pbtxt")}
        start = last = time.monotonic()
        while not wanted <= (listed := self.dynamo_models()):
            if time.monotonic() - start > timeout_s:
                raise SystemExit(f"Dynamo lists {sorted(listed)}, not yet {sorted(wanted - listed)}; see .run/logs")
            if time.monotonic() - last >= 5:
                say(f"waiting for the Dynamo workers to register: {len(listed & wanted)}/{len(wanted)} models")
                last = time.monotonic()
            time.sleep(0.5)
        say(f"Dynamo lists all {len(wanted)} models after {time.monotonic() - start:.1f}s")

    def down(self) -> None:
        # what supervisord runs, not what these settings name: a stack started with other
        # settings (DYNAMO=1, more replicas) stops whole, and says so
        try:
            names = self.supervisor.programs()
        except PasswordRefused as refused:  # stopped all the same, through its pid file
            say(str(refused))
            names = []
        self.supervisor.shutdown()
        for path in self.pids.glob("*.pid") if self.pids.exists() else []:
            path.unlink()
        order = {s.name: i for i, s in enumerate(self.services())}  # in reverse start order, others first
        for name in sorted(names, key=lambda n: order.get(n, len(order)), reverse=True):
            say(f"{name} stopped")

    def status(self) -> bool:
        ok = True
        configured = self.services()
        for service in configured:
            pid = self.pid(service.name)
            healthy = bool(pid) and (service.health_url is None or http_ok(service.health_url))
            ok &= healthy or not service.required
            state = "ready" if healthy else ("starting/unhealthy" if pid else "stopped")
            print(f"{service.name:15} {state:18} {f'pid {pid}' if pid else ''}")
        for name in [n for n in self.supervisor.programs() if n not in {s.name for s in configured}]:
            pid = self.pid(name)  # started with other settings (DYNAMO=1, TRITON_REPLICAS)
            state = "running" if pid else "stopped"
            print(f"{name:15} {state:18} {f'pid {pid}' if pid else ''}  (not in these settings)")
        if self.pid("triton"):
            for model, ready in self.model_states().items():
                ok &= ready
                print(f"  model {model:10} {'ready' if ready else 'NOT ready'}")
        if not any(self.pid(name) for name in {s.name for s in configured} | set(self.supervisor.programs())):
            print("the stack is not running: make demo (tiny checkpoints, no downloads) or make up (real weights)")
            return True  # stopped is a state, not a failure; a half-running stack still fails
        return ok

    def logs_tail(self, lines: int = 40, follow: bool = False) -> int:
        """Every log's last lines, the service's first (vlm_stack/logs.py); ``follow``: then
        what each gains, prefixed with its service, until Ctrl-C."""
        if follow:
            return stack_logs.follow(self.logs, lines)
        stack_logs.print_tail(self.logs, lines)
        return 0

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
        if c.without_triton:
            rows[3:] = [
                (
                    "KServe v2 HTTP (service)",
                    f"{gateway}/v2" if "nginx" in has else f"http://127.0.0.1:{c.api_port}/v2",
                ),
                ("KServe gRPC", "not served without Triton (INFERENCE_BACKEND=local)"),
            ]
        if c.dynamo:
            rows.append(("Dynamo KServe gRPC", f"localhost:{c.dynamo_grpc_port}"))
            rows.append(("Dynamo metrics", f"http://127.0.0.1:{c.dynamo_metrics_port}/metrics"))
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
