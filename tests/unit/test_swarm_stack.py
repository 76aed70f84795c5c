"""deploy/swarm/: the stack file is kept consistent with docker-compose-cpu.yml, and has what
Swarm on this kind of kernel needs (scripts/swarm_test.sh deploys it on a 3-node swarm)."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.conftest import ROOT

SWARM = ROOT / "deploy" / "swarm"


def load(path) -> dict:
    return yaml.safe_load(path.read_text())  # (YAML merge keys resolved)


@pytest.fixture(scope="module")
def stack() -> dict:
    return load(SWARM / "vlm-serve.yml")["services"]


@pytest.fixture(scope="module")
def compose() -> dict:
    services = load(ROOT / "docker-compose-cpu.yml")["services"]
    return {name: s for name, s in services.items() if not s.get("profiles")}  # grafana: a profile


# What differs from Compose on purpose, per service and variable (see the stack file's header).
SWARM_ONLY_ENV = {
    "triton": {"TRITON_DRAIN_S"},
    "nginx": {"NGINX_DISCOVER"},
}
DIFFERENT_ENV = {("nginx", "NGINX_AUTH_REQUEST")}  # stack files cannot nest ${...}


def test_the_same_services_images_environment_health_checks_and_commands(stack, compose):
    assert set(stack) == set(compose)
    for name, service in stack.items():
        theirs = compose[name]
        assert service["image"] == theirs["image"], name
        assert service["healthcheck"] == theirs["healthcheck"], name
        assert service.get("command") == (theirs.get("command") or None), name
        ours_env, their_env = service.get("environment", {}), theirs.get("environment", {})
        assert set(ours_env) - set(their_env) == SWARM_ONLY_ENV.get(name, set()), name
        assert set(their_env) <= set(ours_env), f"{name}: {set(their_env) - set(ours_env)} missing"
        for key, value in their_env.items():
            if (name, key) not in DIFFERENT_ENV:
                assert ours_env[key] == value, f"{name}: {key}"
        assert service.get("init") is True and service.get("cap_drop") == ["ALL"], name


def test_only_what_swarm_accepts(stack):
    for name, service in stack.items():
        # refused (depends_on conditions) or ignored (build, restart, shm_size) by Swarm
        assert not {"depends_on", "build", "restart", "shm_size"} & set(service), name
        # no IPVS here: no virtual IPs, no ingress mesh
        assert service["deploy"]["endpoint_mode"] == "dnsrr", name
        for port in service.get("ports", []):
            assert isinstance(port, dict) and port["mode"] == "host", f"{name}: {port}"
        for volume in service.get("volumes", []):
            if isinstance(volume, dict) and volume["type"] == "bind":
                assert volume["source"].startswith("${"), f"{name}: a bind mount must be a setting: {volume}"


def test_triton_rolls_over_gently_and_has_shared_memory(stack):
    triton = stack["triton"]
    update = triton["deploy"]["update_config"]
    assert update["order"] == "start-first" and update["parallelism"] == 1
    assert triton["deploy"]["replicas"] == "${TRITON_REPLICAS:-1}"
    shm = [v for v in triton["volumes"] if isinstance(v, dict) and v["target"] == "/dev/shm"]
    assert shm and shm[0]["type"] == "tmpfs" and shm[0]["tmpfs"]["size"] >= 2**30
    drain = int(re.search(r":-(\d+)}", triton["environment"]["TRITON_DRAIN_S"]).group(1))
    grace = int(triton["stop_grace_period"].rstrip("s"))
    assert 0 < drain < grace, "Swarm kills the task before it has drained and stopped"


def test_nginx_finds_every_upstream_again_in_dns(stack):
    env = stack["nginx"]["environment"]
    pairs = dict(pair.split("=", 1) for pair in env["NGINX_DISCOVER"].split())
    assert pairs == {
        "FASTAPI_SERVERS": "tasks.fastapi:8080",
        "TRITON_HTTP_SERVERS": "tasks.triton:8000",
        "TRITON_GRPC_SERVERS": "tasks.triton:8001",
    }
    template = (ROOT / "nginx" / "templates" / "vlm.conf.template").read_text()
    placeholders = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", template))
    assert placeholders <= set(env), f"the template needs {placeholders - set(env)}"


def test_config_files_are_the_repositorys(stack):
    configs = load(SWARM / "vlm-serve.yml")["configs"]
    for name, config in configs.items():
        assert (SWARM / config["file"]).resolve().is_file(), name
        assert config["name"].endswith("-${VLM_CONFIG_VERSION:-0}"), name
    # everything Compose mounts from ./prometheus reaches the Prometheus task
    mounted = {c["target"] for c in stack["prometheus"]["configs"]}
    folder = ROOT / "prometheus"
    files = {f"/etc/prometheus/{p.relative_to(folder)}" for p in folder.rglob("*") if p.is_file()}
    assert mounted == files


def test_the_gpu_file_asks_swarm_for_one_gpu_per_task():
    gpu = load(SWARM / "gpu.yml")["services"]["triton"]
    gpu_compose = load(ROOT / "docker-compose.yml")["services"]["triton"]
    assert gpu["image"] == gpu_compose["image"]
    (resource,) = gpu["deploy"]["resources"]["reservations"]["generic_resources"]
    assert resource["discrete_resource_spec"] == {"kind": "NVIDIA-GPU", "value": 1}
