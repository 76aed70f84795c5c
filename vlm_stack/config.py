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
)


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
            max_body=env.get("NGINX_MAX_BODY", "25m"),
            run_dir=Path(env.get("STACK_RUN_DIR", ROOT / ".run")),
            models_dir=env.get("VLM_MODELS_DIR", ""),
            env=env,
        )

    def nginx_vars(self) -> dict[str, str]:
        """Values for nginx/templates/*.template (the Compose image uses the same names)."""
        return {
            "NGINX_PORT": f"127.0.0.1:{self.nginx_port}" if self.env.get("NGINX_LOCAL_ONLY") else str(self.nginx_port),
            "NGINX_GRPC_PORT": f"127.0.0.1:{self.nginx_grpc_port}",
            "NGINX_STATUS_PORT": f"127.0.0.1:{self.nginx_status_port}",
            "FASTAPI_UPSTREAM": f"127.0.0.1:{self.api_port}",
            "TRITON_HTTP_UPSTREAM": f"127.0.0.1:{self.triton_http_port}",
            "TRITON_GRPC_UPSTREAM": f"127.0.0.1:{self.triton_grpc_port}",
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
