"""Start-up helpers: mode detection (with fake system commands), templates, port settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vlm_stack.config import StackConfig
from vlm_stack.render import render

TOOLS = ["bash", "grep", "timeout", "env", "cat"]


def _sandbox_path(tmp_path: Path, fakes: dict[str, str]) -> str:
    """A PATH with only basic tools and the given fake commands (name -> script body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in set(TOOLS) - set(fakes):  # a fake never writes through a link to the real tool
        real = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    for name, body in fakes.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/bash\n{body}\n")
        script.chmod(0o755)
    return str(bin_dir)


def detect(tmp_path: Path, fakes: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "scripts" / "detect.sh")],
        env={"PATH": _sandbox_path(tmp_path, fakes), **env},
        capture_output=True,
        text=True,
    )


DOCKER = 'case "$1" in info) echo "Runtimes: {runtimes}";; compose) echo "Docker Compose version v2.26.1";; esac'
SMI = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)"'


def test_no_docker_means_local_even_with_a_gpu(tmp_path):
    assert detect(tmp_path, {"nvidia-smi": SMI}).stdout.strip() == "local"


def test_docker_without_gpu_means_the_cpu_file(tmp_path):
    assert detect(tmp_path, {"docker": DOCKER.format(runtimes="runc")}).stdout.strip() == "cpu"


def test_fake_nvidia_smi_with_the_nvidia_runtime_picks_the_gpu_file(tmp_path):
    fakes = {"docker": DOCKER.format(runtimes="io.containerd.runc.v2 nvidia runc"), "nvidia-smi": SMI}
    assert detect(tmp_path, fakes).stdout.strip() == "gpu"


def test_gpu_without_container_toolkit_falls_back_to_cpu(tmp_path):
    fakes = {"docker": DOCKER.format(runtimes="runc"), "nvidia-smi": SMI}
    assert detect(tmp_path, fakes).stdout.strip() == "cpu"


def test_docker_without_a_daemon_means_local(tmp_path):
    assert detect(tmp_path, {"docker": "exit 1"}).stdout.strip() == "local"


def test_mode_can_be_forced_and_is_checked(tmp_path):
    assert detect(tmp_path, {}, VLM_STACK_MODE="gpu").stdout.strip() == "gpu"
    (tmp_path / "again").mkdir()
    wrong = detect(tmp_path / "again", {}, VLM_STACK_MODE="tpu")
    assert wrong.returncode == 2 and "gpu, cpu or local" in wrong.stderr


def test_compose_files_use_the_detected_mode():
    script = (ROOT / "triton_start.sh").read_text()
    assert "docker-compose.yml" in script and "docker-compose-cpu.yml" in script and "vlm_stack" in script


def test_nginx_template_renders_for_local_ports_and_misses_nothing():
    config = StackConfig.from_env({"NGINX_PORT": "8088", "API_PORT": "9000", "TRITON_HTTP_PORT": "9001"})
    text = render((ROOT / "nginx/templates/vlm.conf.template").read_text(), config.nginx_vars())
    assert "listen 8088;" in text and "server 127.0.0.1:9000;" in text and "server 127.0.0.1:9001;" in text
    assert "${" not in text
    assert "$request_id" in text  # nginx's own variables are left alone
    with pytest.raises(KeyError, match="NGINX_MAX_BODY"):
        render("client_max_body_size ${NGINX_MAX_BODY};", {})


def test_nginx_closes_idle_connections_to_the_service_before_the_service_does():
    """Otherwise a chat (a POST, never retried) sent on a kept connection just as the service
    closes it gets nginx's 502, and nginx does not retry a POST."""
    import re

    from vlm_stack.procs import SERVICE_KEEP_ALIVE_S, uvicorn_command

    config = StackConfig.from_env({})
    text = render((ROOT / "nginx/templates/vlm.conf.template").read_text(), config.nginx_vars())
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\n\}", text, flags=re.S))
    assert set(upstreams) >= {"vlm_fastapi", "vlm_admission", "vlm_triton_http", "vlm_triton_grpc"}
    # the admission hop is nginx to itself: no kept connections (tests/e2e/test_nginx_reload.py)
    assert "keepalive" not in upstreams.pop("vlm_admission")
    for name, body in upstreams.items():
        assert "keepalive " in body, name
        idle = re.search(r"keepalive_timeout (\d+)s;", body)
        assert idle and int(idle.group(1)) < SERVICE_KEEP_ALIVE_S, (name, body)

    def flag(command: list[str]) -> int:
        return int(command[command.index("--timeout-keep-alive") + 1])

    assert flag(uvicorn_command(8080)) == SERVICE_KEEP_ALIVE_S  # the local stack and supervisord
    dockerfile = (ROOT / "docker/Dockerfile.fastapi").read_text()
    entrypoint = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
    assert flag(json.loads(entrypoint.removeprefix("ENTRYPOINT"))) == SERVICE_KEEP_ALIVE_S  # Compose, Swarm, Helm
    api = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "fastapi_app.main:create_app" in line)
    assert flag(api.split()) == SERVICE_KEEP_ALIVE_S  # make api


def test_port_settings_are_validated():
    with pytest.raises(SystemExit, match="NGINX_PORT must be a port number"):
        StackConfig.from_env({"NGINX_PORT": "eighty"})
    with pytest.raises(SystemExit, match="between 1 and 65535"):
        StackConfig.from_env({"API_PORT": "70000"})
    assert StackConfig.from_env({"NGINX_MAX_BODY": "25m"}).max_body_bytes() == 25 * 1024 * 1024


def test_port_80_without_root_says_so_and_offers_another():
    from vlm_stack.local import check_port_privilege

    with pytest.raises(SystemExit, match=r"port 80 needs root.*NGINX_PORT=8088"):
        check_port_privilege(80, euid=1000)
    check_port_privilege(80, euid=0)
    check_port_privilege(8088, euid=1000)


def test_free_ports_are_distinct_and_free():
    from vlm_stack.local import port_in_use
    from vlm_stack.procs import free_ports

    ports = free_ports(200) + free_ports(200)  # this process never hands a port out twice
    assert len(set(ports)) == 400
    assert not any(port_in_use(port) for port in ports[:20])


def test_free_ports_lie_below_the_kernels_ephemeral_range():
    """A port the kernel hands to another process's bind(0) or connection is never chosen
    (CI: vLLM's engine core took nginx's port while Triton loaded)."""
    from vlm_stack.procs import LOWEST_CHOSEN_PORT, ephemeral_range, free_ports

    low, _ = ephemeral_range()
    assert all(LOWEST_CHOSEN_PORT <= port < low for port in free_ports(50))


def test_a_port_something_listens_on_is_not_chosen(monkeypatch):
    import socket

    from vlm_stack import procs

    monkeypatch.setattr(procs, "_handed_out", set())
    (port,) = procs.free_ports(1)
    start = port - procs.LOWEST_CHOSEN_PORT
    monkeypatch.setattr(procs.random, "randrange", lambda span: start)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        procs._handed_out.clear()
        (chosen,) = procs.free_ports(1)
    assert chosen != port
    procs._handed_out.clear()
    assert procs.free_ports(1) == [port]  # the same start, the listener gone: the port again


def test_two_services_on_one_port_are_refused_before_anything_starts(tmp_path):
    config = StackConfig.from_env({"NGINX_EXPORTER_PORT": "8001", "STACK_RUN_DIR": str(tmp_path)})
    with pytest.raises(SystemExit, match="NGINX_EXPORTER_PORT and TRITON_GRPC_PORT are both 8001"):
        config.check_ports()
    replicas = StackConfig.from_env({"TRITON_REPLICAS": "2", "TRITON_REPLICA_PORTS": "9000:9001:9002:9090"})
    with pytest.raises(SystemExit, match="PROMETHEUS_PORT and triton-1's health port are both 9090"):
        replicas.check_ports()
    StackConfig.from_env({"TRITON_REPLICAS": "3"}).check_ports()  # the defaults: + 10 per replica


def test_a_port_taken_by_another_process_is_named_and_nothing_is_left_running(tmp_path):
    """The real launcher against a socket that holds Triton's HTTP port."""
    import socket

    from vlm_stack.local import port_in_use
    from vlm_stack.procs import ephemeral_stack_env

    env = {**ephemeral_stack_env(tmp_path / "run", tmp_path / "models"), "VLM_STACK_MODE": "local"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["TRITON_HTTP_PORT"])))
        taken.listen()
        assert port_in_use(int(env["TRITON_HTTP_PORT"]))
        up = subprocess.run([str(ROOT / "triton_start.sh"), "up"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert up.returncode != 0
    assert f"triton cannot start: port {env['TRITON_HTTP_PORT']} (TRITON_HTTP_PORT) is in use" in up.stderr
    assert not (tmp_path / "run" / "supervisor.sock").exists()  # the launcher took supervisord down again


def system_packages(tmp_path: Path, fakes: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """scripts/system_packages.sh with only the given commands on PATH (no nginx in /usr/sbin)."""
    fakes = {"chmod": 'exec /bin/chmod "$@"', "rm": 'exec /bin/rm "$@"', **fakes}
    env = {"PATH": _sandbox_path(tmp_path, fakes), "NGINX_SBIN": "/nonexistent", "POLICY_RC_D": str(tmp_path / "rc")}
    return subprocess.run(
        [str(ROOT / "scripts" / "system_packages.sh"), *args], env=env, capture_output=True, text=True
    )


def test_missing_packages_without_root_stop_with_the_command_to_run(tmp_path):
    result = system_packages(tmp_path, {"id": "echo 1000", "apt-get": "exit 1"})
    assert result.returncode == 3, result
    assert "sudo apt-get install -y --no-install-recommends nginx prometheus prometheus-nginx-exporter" in result.stderr


def test_missing_packages_as_root_are_installed_with_apt_and_start_no_service(tmp_path):
    log = tmp_path / "apt.log"
    apt = f'echo "$* policy:$(grep -c "exit 101" {tmp_path / "rc"})" >> {log}'
    result = system_packages(tmp_path, {"id": "echo 0", "apt-get": apt}, "--tests")
    assert result.returncode == 0, result
    update, install = log.read_text().splitlines()
    assert update == "update -qq policy:1", update  # services are held back meanwhile
    assert install.startswith("install -y -qq --no-install-recommends chromium nginx prometheus")
    assert not (tmp_path / "rc").exists(), "the policy file is removed afterwards"


def test_nothing_missing_means_nothing_to_do(tmp_path):
    present = {name: "true" for name in ("nginx", "prometheus", "prometheus-nginx-exporter")}
    result = system_packages(tmp_path, {"id": "echo 1000", "apt-get": "exit 1", **present})
    assert result.returncode == 0 and result.stderr == "" and result.stdout == ""


def test_dynamo_adds_its_frontend_and_a_worker_per_triton_replica(tmp_path):
    from vlm_stack.local import LocalStack

    env = {"DYNAMO": "1", "TRITON_REPLICAS": "2", "STACK_RUN_DIR": str(tmp_path), "DYNAMO_GRPC_PORT": "9787"}
    stack = LocalStack(StackConfig.from_env(env))
    services = {s.name: s for s in stack.services()}
    frontend = services["dynamo-frontend"]
    assert "--kserve-grpc-server" in frontend.command and "--http-port=9787" in frontend.command
    assert frontend.env["DYN_DISCOVERY_BACKEND"] == "file"
    assert frontend.env["DYN_FILE_KV"] == str(tmp_path / "dynamo-kv")
    assert frontend.env["DYN_RUNTIME_INHIBITED_DURATION_SECS"] == "30"
    tritons = [r.grpc_port for r in stack.c.replicas()]
    workers = [services["dynamo-worker"], services["dynamo-worker-1"]]
    assert [w.command[-1] for w in workers] == [f"--triton=127.0.0.1:{port}" for port in tritons]
    assert [w.env["DYN_SYSTEM_PORT"] for w in workers] == ["8789", "8790"]
    stack.c.check_ports()
    etcd = StackConfig.from_env({**env, "DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": "http://10.0.0.1:2379"})
    assert "DYN_FILE_KV" not in etcd.dynamo_env() and etcd.dynamo_env()["DYN_DISCOVERY_BACKEND"] == "etcd"
    assert not any(s.name.startswith("dynamo") for s in LocalStack(StackConfig.from_env({})).services())
    with pytest.raises(SystemExit, match="file or etcd"):
        StackConfig.from_env({"DYNAMO": "1", "DYN_DISCOVERY_BACKEND": "nats"}).dynamo_env()


def test_the_default_history_file_is_runtime_data_git_ignores():
    """Running the service must not change a tracked file (issue 27, point 7)."""
    from fastapi_app.settings import Settings

    path = Settings.model_fields["history_db"].default
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
    assert tracked.returncode != 0 and ignored.returncode == 0, f"{path} is tracked or not ignored"


def test_make_status_of_a_stopped_stack_exits_0_and_says_how_to_start_it(tmp_path):
    env = {**os.environ, "STACK_RUN_DIR": str(tmp_path / "run"), "VLM_STACK_MODE": "local", "PYTHON": sys.executable}
    status = subprocess.run(["make", "-s", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "stopped" in status.stdout and "make demo" in status.stdout


@pytest.mark.parametrize("installed_from", ["here", "elsewhere", "nowhere"])
def test_make_install_installs_again_when_the_engine_comes_from_another_folder(tmp_path, installed_from):
    """The install stamp stands only while ``vlm_engine`` is this checkout's editable install: a
    moved checkout, or another one installed into the same Python since, installs again (the
    notebook's kernel imported the other folder's code, or nothing)."""
    work = tmp_path / "checkout"
    (work / ".cache").mkdir(parents=True)
    (work / "scripts").mkdir()
    for name in ("Makefile", "pyproject.toml", "scripts/install_triton.sh"):
        (work / name).write_text((ROOT / name).read_text())
    (work / ".cache" / "installed.stamp").touch()
    origin = {"here": work, "elsewhere": tmp_path / "other", "nowhere": None}[installed_from]
    python = tmp_path / "python"  # answers the Makefile's find_spec question, else is Python
    answer = f"echo {origin.resolve()}" if origin else "echo"
    python.write_text(f'#!/bin/sh\ncase "$*" in *find_spec*) {answer}; exit 0;; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    (work / ".triton").mkdir()
    (work / ".triton" / f".installed-0.7.0-py{version}").touch()
    dry = subprocess.run(
        ["make", "-n", "install", f"PYTHON={python}"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    installs = "pip install --quiet -e" in dry.stdout
    assert installs == (installed_from != "here"), dry.stdout
    assert (work / ".cache" / "installed.stamp").exists() == (installed_from == "here")
