"""Ports and paths of the stack, from the environment, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT_NAMES = (
    "NGINX_PORT",
    "NGINX_GRPC_PORT",
    "NGINX_STATUS_PORT",
    "NGINX_EXPORTER_PORT",
    "API_PORT",
    "TRITON_HTTP_PORT",
    "TRITON_GRPC_PORT",
    "TRITON_METRICS_PORT",
    "TRITON_HEALTH_PORT",
    "PROMETHEUS_PORT",
    "DYNAMO_GRPC_PORT",
    "DYNAMO_METRICS_PORT",
)


# Dynamo logs a few INFO lines per request (workers: received, completed; the frontend: routed,
# completed): keep its other INFO lines, and errors of each request
QUIET_DYNAMO_LOG = (
    "info,dynamo_runtime::pipeline::network::ingress::push_handler=warn,"
    "dynamo_runtime::pipeline::network::egress::push_router=warn,dynamo_llm::http::service::metrics=warn,"
    "router=warn"
)
REPLICA_PORT_STEP = 10  # replica i listens on the Triton ports + 10*i, unless TRITON_REPLICA_PORTS says


@dataclass(frozen=True)
class Replica:
    """One tritonserver (with its watchdog) of the stack."""

    index: int
    http_port: int
    grpc_port: int
    metrics_port: int
    health_port: int

    @property
    def name(self) -> str:
        return "triton" if self.index == 0 else f"triton-{self.index}"


def _port(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    try:
        port = int(value) if value else default
    except ValueError:
        raise SystemExit(f"{name} must be a port number, got {value!r}") from None
    if not 0 < port < 65536:
        raise SystemExit(f"{name} must be between 1 and 65535, got {port}")
    return port


@dataclass
class StackConfig:
    nginx_port: int = 80
    nginx_grpc_port: int = 8081
    nginx_status_port: int = 8090
    exporter_port: int = 9113
    api_port: int = 8080
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_health_port: int = 8003
    prometheus_port: int = 9090
    dynamo_grpc_port: int = 8787
    dynamo_metrics_port: int = 8788
    triton_replicas: int = 1
    replica_ports: str = ""
    max_body: str = "25m"
    run_dir: Path = ROOT / ".run"
    models_dir: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StackConfig:
        env = dict(os.environ if env is None else env)
        return cls(
            nginx_port=_port(env, "NGINX_PORT", 80),
            nginx_grpc_port=_port(env, "NGINX_GRPC_PORT", 8081),
            nginx_status_port=_port(env, "NGINX_STATUS_PORT", 8090),
            exporter_port=_port(env, "NGINX_EXPORTER_PORT", 9113),
            api_port=_port(env, "API_PORT", 8080),
            triton_http_port=_port(env, "TRITON_HTTP_PORT", 8000),
            triton_grpc_port=_port(env, "TRITON_GRPC_PORT", 8001),
            triton_metrics_port=_port(env, "TRITON_METRICS_PORT", 8002),
            triton_health_port=_port(env, "TRITON_HEALTH_PORT", 8003),
            prometheus_port=_port(env, "PROMETHEUS_PORT", 9090),
            dynamo_grpc_port=_port(env, "DYNAMO_GRPC_PORT", 8787),
            dynamo_metrics_port=_port(env, "DYNAMO_METRICS_PORT", 8788),
            triton_replicas=_replicas(env),
            replica_ports=env.get("TRITON_REPLICA_PORTS", ""),
            max_body=env.get("NGINX_MAX_BODY", "25m"),
            run_dir=Path(env.get("STACK_RUN_DIR", ROOT / ".run")),
            models_dir=env.get("VLM_MODELS_DIR", ""),
            env=env,
        )

    @property
    def without_triton(self) -> bool:
        """``INFERENCE_BACKEND=local``: no tritonserver; the service runs the engine and answers
        KServe v2 over HTTP itself (nginx sends ``/v2`` to it)."""
        return self.env.get("INFERENCE_BACKEND", "triton") == "local"

    @property
    def dynamo(self) -> bool:
        """``DYNAMO=1``: NVIDIA Dynamo's frontend (KServe gRPC on ``DYNAMO_GRPC_PORT``) and one
        ``vlm_dynamo.worker`` per Triton replica, besides the rest of the stack."""
        value = self.env.get("DYNAMO", "").strip().lower()
        if value not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SystemExit(f"DYNAMO must be 1 or 0, got {value!r}")
        return value in ("1", "true", "yes")

    def dynamo_env(self) -> dict[str, str]:
        """Discovery for the Dynamo frontend and workers: a folder on one host (``file``, the
        default) or etcd across hosts (``DYN_DISCOVERY_BACKEND=etcd``, ``ETCD_ENDPOINTS``)."""
        backend = self.env.get("DYN_DISCOVERY_BACKEND", "file")
        if backend not in ("file", "etcd"):
            raise SystemExit(f"DYN_DISCOVERY_BACKEND must be file or etcd, got {backend!r}")
        env = {
            "DYN_DISCOVERY_BACKEND": backend,
            "DYN_NAMESPACE": self.env.get("DYN_NAMESPACE", "vlm"),
            "DYN_LOG": self.env.get("DYN_LOG", QUIET_DYNAMO_LOG),
        }
        if backend == "file":
            env["DYN_FILE_KV"] = self.env.get("DYN_FILE_KV", str(self.run_dir / "dynamo-kv"))
        return env

    def dynamo_worker_ports(self) -> list[int]:
        """Each Dynamo worker's status port (``/metrics``, ``/health``): after the frontend's."""
        return [self.dynamo_metrics_port + 1 + r.index for r in self.replicas()]

    def replicas(self) -> list[Replica]:
        """``TRITON_REPLICAS`` tritonservers; the first on the Triton ports, replica i on them
        + 10*i, or on ``TRITON_REPLICA_PORTS`` ("http:grpc:metrics:health,..." for 1, 2, ...).
        None without Triton."""
        if self.without_triton:
            return []
        given = [p.split(":") for p in self.replica_ports.split(",") if p.strip()]
        replicas = []
        for i in range(self.triton_replicas):
            if i > 0 and len(given) >= i:
                ports = [int(p) for p in given[i - 1]]
            else:
                base = (self.triton_http_port, self.triton_grpc_port, self.triton_metrics_port, self.triton_health_port)
                ports = [p + REPLICA_PORT_STEP * i for p in base]
            replicas.append(Replica(i, *ports))
        return replicas

    def listening_ports(self) -> dict[str, int]:
        """Every port the local stack listens on, by the setting that names it."""
        ports = {
            "NGINX_PORT": self.nginx_port,
            "NGINX_GRPC_PORT": self.nginx_grpc_port,
            "NGINX_STATUS_PORT": self.nginx_status_port,
            "NGINX_EXPORTER_PORT": self.exporter_port,
            "API_PORT": self.api_port,
            "PROMETHEUS_PORT": self.prometheus_port,
        }
        if self.dynamo:
            ports["DYNAMO_GRPC_PORT"] = self.dynamo_grpc_port
            ports["DYNAMO_METRICS_PORT"] = self.dynamo_metrics_port
            for index, port in enumerate(self.dynamo_worker_ports()):
                ports[f"dynamo worker {index}'s status port"] = port
        for replica in self.replicas():
            values = (replica.http_port, replica.grpc_port, replica.metrics_port, replica.health_port)
            for kind, port in zip(("HTTP", "GRPC", "METRICS", "HEALTH"), values, strict=True):
                name = f"TRITON_{kind}_PORT" if replica.index == 0 else f"{replica.name}'s {kind.lower()} port"
                ports[name] = port
        return ports

    def check_ports(self) -> None:
        """Refuse two services on one port: the second would fail to bind, or answer for the first."""
        owner: dict[int, str] = {}
        for name, port in self.listening_ports().items():
            if port in owner:
                raise SystemExit(f"{owner[port]} and {name} are both {port}: give each its own port")
            owner[port] = name

    def triton_grpc_target(self) -> str:
        """The service's gRPC target: one address, or all replicas' for round-robin."""
        addresses = [f"127.0.0.1:{r.grpc_port}" for r in self.replicas()] or [f"127.0.0.1:{self.triton_grpc_port}"]
        return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)

    def nginx_vars(self) -> dict[str, str]:
        """Values for nginx/templates/*.template (the Compose image uses the same names)."""
        return {
            "NGINX_PORT": f"127.0.0.1:{self.nginx_port}" if self.env.get("NGINX_LOCAL_ONLY") else str(self.nginx_port),
            "NGINX_GRPC_PORT": f"127.0.0.1:{self.nginx_grpc_port}",
            "NGINX_STATUS_PORT": f"127.0.0.1:{self.nginx_status_port}",
            "FASTAPI_SERVERS": f"server 127.0.0.1:{self.api_port};",
            # without Triton, /v2 goes to the service (KServe v2 over HTTP); gRPC is not served then
            "TRITON_HTTP_SERVERS": " ".join(f"server 127.0.0.1:{r.http_port};" for r in self.replicas())
            or f"server 127.0.0.1:{self.api_port};",
            "TRITON_GRPC_SERVERS": " ".join(f"server 127.0.0.1:{r.grpc_port};" for r in self.replicas())
            or f"server 127.0.0.1:{self.api_port};",
            "NGINX_MAX_BODY": self.max_body,
            "NGINX_ACCESS_LOG": str(self.run_dir / "logs" / "nginx-access.log"),
            "NGINX_AUTH_REQUEST": "/_auth" if self.env.get("API_KEYS") or self.env.get("API_KEYS_FILE") else "off",
            "NGINX_RATE": self.env.get("NGINX_RATE") or "50",
            "NGINX_BURST": self.env.get("NGINX_BURST") or "200",
            "NGINX_CONNECTIONS": self.env.get("NGINX_CONNECTIONS") or "256",
            "NGINX_MAX_CHATS": self.env.get("NGINX_MAX_CHATS") or "80",
            "NGINX_MAX_PER_MODEL": self.env.get("NGINX_MAX_PER_MODEL") or "80",
            "NGINX_ADMISSION_SOCKET": str(self.run_dir / "nginx-admission.sock"),
        }

    def max_body_bytes(self) -> int:
        units = {"k": 1024, "m": 1024**2, "g": 1024**3}
        text = self.max_body.strip().lower()
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _replicas(env: dict[str, str]) -> int:
    value = env.get("TRITON_REPLICAS", "") or "1"
    if not value.isdigit() or not 1 <= int(value) <= 16:
        raise SystemExit(f"TRITON_REPLICAS must be a number from 1 to 16, got {value!r}")
    return int(value)
