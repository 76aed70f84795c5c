"""``make logs`` (the order of the services, nginx's access lines shortened, follow mode on the
local stack and with Compose), the service's line per request, and supervisord started from
the rendered config: no CRIT line, its socket behind a password the stack's client knows."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import xmlrpc.client
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vlm_stack import logs as stack_logs

DEADLINE_S = 120  # generous: these wait on a child process, never on a timer


def poll(check, what: str, timeout_s: float = DEADLINE_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


ACCESS = {
    "time": "2026-03-02T14:05:09+00:00",
    "request_id": "6f1c9e0b8a5d4e2f9c7b1a3d5e7f9b2c",
    "remote_addr": "127.0.0.1",
    "method": "POST",
    "uri": "/v1/chat/completions",
    "status": 200,
    "bytes_sent": 1834,
    "request_length": 48211,
    "request_time": 0.812,
    "upstream": "127.0.0.1:8080",
    "upstream_status": "200",
    "upstream_connect_time": "0.000",
    "upstream_header_time": "0.811",
    "upstream_response_time": "0.812",
    "user_agent": "python-httpx/0.28.1",
}
ACCESS_LINE = json.dumps(ACCESS, separators=(",", ":"))
SHORT = "2026-03-02 14:05:09 POST /v1/chat/completions 200 812ms id=6f1c9e0b8a5d4e2f9c7b1a3d5e7f9b2c"


def _logs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "nginx-access.log": ACCESS_LINE + "\n",
        "nginx-error.log": "2026/03/02 14:00:00 [warn] 1#1: a warning\n",
        "nginx.log": "",
        "nginx-exporter.log": "exporter line\n",
        "prometheus.log": "prometheus line\n",
        "supervisord.log": "2026-03-02 14:00:00,000 INFO spawned: 'fastapi' with pid 7\n",
        "triton-1.log": "replica line\n",
        "triton.log": "triton line\n",
        "fastapi.log": "2026-03-02 14:05:09 POST /v1/chat/completions 200 811.9ms\n",
        "dynamo-worker.log": "worker line\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_logs_come_in_reading_order_the_service_first(tmp_path):
    order = [p.name for p in stack_logs.log_files(_logs(tmp_path / "logs"))]
    assert order == [
        "fastapi.log",
        "triton.log",
        "triton-1.log",
        "nginx.log",
        "nginx-error.log",
        "nginx-access.log",
        "prometheus.log",
        "dynamo-worker.log",
        "nginx-exporter.log",
        "supervisord.log",
    ]
    ten = [Path(f"triton-{n}.log") for n in (10, 2)]
    assert sorted(ten, key=stack_logs.order_key) == ten[::-1]  # replicas by number, not by text


def test_nginx_access_lines_are_one_short_line_and_the_file_stays_json(tmp_path, capsys):
    folder = _logs(tmp_path / "logs")
    assert len(ACCESS_LINE) > 400 and stack_logs.short_access_line(ACCESS_LINE) == SHORT
    stack_logs.print_tail(folder, lines=40)
    out = capsys.readouterr().out
    assert SHORT in out and '"upstream_header_time"' not in out
    assert out.index("fastapi.log <==") < out.index("triton.log <==") < out.index("nginx-access.log <==")
    assert f"==> {folder / 'nginx.log'} <== (empty)" in out
    assert (folder / "nginx-access.log").read_text() == ACCESS_LINE + "\n"  # left as it is
    # other lines and other files as they are; a broken or foreign JSON line too
    assert stack_logs.short_access_line("not json") == "not json"
    assert stack_logs.short_access_line('{"level": "info"}') == '{"level": "info"}'
    assert stack_logs.readable(folder / "fastapi.log", ACCESS_LINE) == ACCESS_LINE
    no_id = stack_logs.short_access_line(json.dumps({**ACCESS, "request_id": "", "uri": "/" + "x" * 300}))
    assert no_id.endswith("… 200 812ms") and len(no_id) < 140


def test_the_follower_prefixes_each_line_with_its_service_and_survives_rotation(tmp_path):
    folder = _logs(tmp_path / "logs")
    follower = stack_logs.Follower(folder, lines=1)
    first = follower.start()
    width = len("nginx-exporter")
    assert first[0] == f"{'fastapi':<{width}} | 2026-03-02 14:05:09 POST /v1/chat/completions 200 811.9ms"
    assert f"{'nginx-access':<{width}} | {SHORT}" in first
    assert follower.poll() == []
    with (folder / "triton.log").open("a") as log:
        log.write("model loaded\nhalf a li")  # the second line is still being written
    with (folder / "nginx-access.log").open("a") as log:
        log.write(ACCESS_LINE + "\n")
    assert follower.poll() == [f"{'triton':<{width}} | model loaded", f"{'nginx-access':<{width}} | {SHORT}"]
    with (folder / "triton.log").open("a") as log:
        log.write("ne\n")
    assert follower.poll() == [f"{'triton':<{width}} | half a line"]
    (folder / "fastapi.log").write_text("after rotation\n")  # shorter: read from its start
    (folder / "dynamo-frontend.log").write_text("a new service\n")  # a new file: from its start
    assert follower.poll() == [
        f"{'fastapi':<{width}} | after rotation",
        f"{'dynamo-frontend':<{width}} | a new service",
    ]


def test_follow_mode_prints_what_logs_gain_and_ends_cleanly_on_ctrl_c(tmp_path):
    folder = _logs(tmp_path / "run" / "logs")
    out_path = tmp_path / "out.txt"
    env = {**os.environ, "STACK_RUN_DIR": str(tmp_path / "run"), "PYTHONUNBUFFERED": "1"}
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlm_stack", "logs", "--follow"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        poll(lambda: "[logs] following" in out_path.read_text(), "the follower started")
        with (folder / "fastapi.log").open("a") as log:
            log.write("GET /v1/models 200 1.2ms\n")
        poll(lambda: "fastapi" in out_path.read_text().split("[logs] following")[1], "the new line printed")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out_path.read_text().splitlines()[-1].endswith(" | GET /v1/models 200 1.2ms")


def _fake(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/bash\n{body}\n")
    (folder / name).chmod(0o755)


def test_the_launcher_passes_follow_mode_to_compose_and_to_the_local_stack(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    _fake(bin_dir, "docker", f'echo "docker $*" >> {calls}')
    _fake(bin_dir, "python-fake", f'echo "python $*" >> {calls}')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python-fake")}

    def launcher(mode: str, *args: str) -> subprocess.CompletedProcess:
        calls.unlink(missing_ok=True)
        return subprocess.run(
            [str(ROOT / "triton_start.sh"), *args], env={**env, "VLM_STACK_MODE": mode}, capture_output=True, text=True
        )

    assert launcher("cpu", "logs", "-f").returncode == 0
    assert calls.read_text() == "docker compose -f docker-compose-cpu.yml logs --tail=100 -f\n"
    assert launcher("cpu", "logs").returncode == 0
    assert calls.read_text() == "docker compose -f docker-compose-cpu.yml logs --tail=100\n"
    assert launcher("local", "logs", "--follow").returncode == 0
    assert calls.read_text() == "python -m vlm_stack logs --follow\n"
    assert launcher("local", "logs").returncode == 0
    assert calls.read_text() == "python -m vlm_stack logs\n"
    wrong = launcher("local", "logs", "--tail")
    assert wrong.returncode == 2 and "usage:" in wrong.stderr and not calls.exists()
    make = subprocess.run(["make", "-n", "logs", "FOLLOW=1"], cwd=ROOT, capture_output=True, text=True)
    assert "./triton_start.sh logs --follow" in make.stdout
    assert "--follow" not in subprocess.run(["make", "-n", "logs"], cwd=ROOT, capture_output=True, text=True).stdout


# The service's line per request -----------------------------------------------------------
def _app():
    from fastapi import FastAPI

    from fastapi_app.middleware import RequestMetrics

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def scrape():
        return ""

    app.add_middleware(RequestMetrics)
    return app


def test_the_service_logs_one_line_per_request_and_keeps_probes_at_debug(caplog):
    from fastapi.testclient import TestClient

    client = TestClient(_app())
    with caplog.at_level(logging.DEBUG, logger="fastapi_app.access"):
        client.get("/v1/models", headers={"X-Request-ID": "req-42"})
        client.get("/nowhere%0Aforged 200")
        client.get("/health")
        client.get("/metrics")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fastapi_app.access"]
    assert len(records) == 4, records
    (level, line), (_, missing), *probes = records
    assert level == logging.INFO
    method, path, status, took, request_id = line.split()
    assert (method, path, status, request_id) == ("GET", "/v1/models", "200", "id=req-42")
    assert took.endswith("ms") and float(took[:-2]) >= 0
    assert missing.startswith("GET /nowhere%0Aforged%20200 404 ")  # as sent: no line of its own
    assert [(lvl, msg.split()[1]) for lvl, msg in probes] == [(logging.DEBUG, "/health"), (logging.DEBUG, "/metrics")]


def test_the_stack_starts_uvicorn_with_a_logging_config_that_shows_those_lines():
    from vlm_stack.procs import UVICORN_LOGGING, uvicorn_command

    command = uvicorn_command(8080)
    assert "--no-access-log" in command and command[command.index("--log-config") + 1] == str(UVICORN_LOGGING)
    # the config as uvicorn loads it (dictConfig), in a process of its own
    script = (
        "import json, logging.config, sys\n"
        f"logging.config.dictConfig(json.load(open({str(UVICORN_LOGGING)!r})))\n"
        "from fastapi.testclient import TestClient\n"
        "from tests.unit.test_stack_logs import _app\n"
        "client = TestClient(_app())\n"
        "client.get('/v1/models'); client.get('/health/ready'); client.get('/health')\n"
        "logging.getLogger('fastapi_app').info('serving moondream2')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 2, lines  # the request and the service's own line; not the probes
    date, clock, method, path, status, _ = lines[0].split()
    assert (method, path, status) == ("GET", "/v1/models", "200") and len(date) == 10 and len(clock) == 8
    assert lines[1].endswith("INFO     fastapi_app: serving moondream2")


# supervisord ------------------------------------------------------------------------------
def configured_supervisor(tmp_path):
    """A run folder, its ``Supervisor`` and the config of one program (``sleeper``) behind a password."""
    from vlm_stack.supervisor import Program, Supervisor, new_credentials, render

    run = tmp_path / "run"
    for sub in ("logs", "pids"):
        (run / sub).mkdir(parents=True)
    supervisor = Supervisor(run)
    sleeper = Program("sleeper", [sys.executable, "-c", "import time; time.sleep(3600)"], {})
    supervisor.write_config(render(run, [sleeper], tmp_path, new_credentials()))
    return run, supervisor, sleeper


def test_supervisord_starts_without_crit_lines_behind_a_password_the_stack_knows(tmp_path):
    from vlm_stack.config import StackConfig
    from vlm_stack.local import LocalStack

    run, supervisor, _ = configured_supervisor(tmp_path)
    assert stat.S_IMODE(supervisor.config.stat().st_mode) == 0o600  # it holds the password
    username, password = supervisor.credentials()
    assert password and f"password={password}" in supervisor.config.read_text()
    try:
        supervisor.start(dict(os.environ), tmp_path)
        supervisor.start_program("sleeper")
        poll(lambda: supervisor.pid("sleeper"), "the program running")
        log = (run / "logs" / "supervisord.log").read_text()
        assert "CRIT" not in log, log
        assert "spawned: 'sleeper'" in log

        # the socket asks for the password: without it, 401
        from supervisor.xmlrpc import SupervisorTransport

        anonymous = SupervisorTransport(None, None, f"unix://{supervisor.socket}")
        with pytest.raises(xmlrpc.client.ProtocolError, match="401"):
            xmlrpc.client.ServerProxy("http://127.0.0.1", transport=anonymous).supervisor.getState()
        # supervisorctl by hand, with the rendered config
        ctl = subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(supervisor.config), "status", "sleeper"],
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert ctl.stdout.split()[:1] == ["sleeper"] and ctl.stdout.split()[1] in ("STARTING", "RUNNING"), ctl

        # `up` again renders the config again: the running supervisord keeps its password
        stack = LocalStack(StackConfig.from_env({"STACK_RUN_DIR": str(run)}))
        stack.write_supervisor_config()
        assert supervisor.credentials() == (username, password)
        assert supervisor.running() and supervisor.programs() == ["sleeper"]
    finally:
        supervisor.shutdown()
    assert not supervisor.running() and not supervisor.socket.exists()
    stack.write_supervisor_config()  # none running: a new password
    assert supervisor.credentials()[1] != password


def test_a_supervisord_that_refuses_the_configs_password_is_named_and_still_stopped(tmp_path):
    """When the config on disk no longer holds the running supervisord's password (another `up`
    rewrote it), asking says so instead of reading "not running", and `down` stops it through
    its pid file: no program is left behind."""
    from vlm_stack.supervisor import PasswordRefused, new_credentials, render

    run, supervisor, sleeper = configured_supervisor(tmp_path)
    try:
        supervisor.start(dict(os.environ), tmp_path)
        supervisor.start_program("sleeper")
        pid = poll(lambda: supervisor.pid("sleeper"), "the program running")
        supervisor.write_config(render(run, [sleeper], tmp_path, new_credentials()))  # another password
        with pytest.raises(PasswordRefused, match="refused the password"):
            supervisor.running()
    finally:
        supervisor.shutdown()
    assert not supervisor.socket.exists() and not supervisor.pidfile.exists()
    poll(lambda: gone(pid), "the program gone")


def gone(pid: int) -> bool:
    """No process ``pid``, or only its zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_a_callers_bytes_make_no_line_of_their_own(tmp_path, caplog):
    """A request id or path with a line separator (``\\n``, U+0085 from ``\\xc2\\x85``) stays on
    its request's line: the service logs only printable ASCII of the id, and ``make logs`` ends
    lines at ``\\n`` only and prints the short nginx line without control characters or query."""
    from fastapi_app.middleware import log_request

    scope = {
        "method": "GET",
        "path": "/v1/models",
        "raw_path": b"/v1/\xc2\x85models",
        "headers": [(b"x-request-id", b"ab\xc2\x85fake\ncd")],
    }
    with caplog.at_level(logging.INFO, logger="fastapi_app.access"):
        log_request(scope, 200, 0.01)
    [record] = caplog.records
    assert record.getMessage().startswith("GET /v1/%C2%85models 200 ") and record.getMessage().endswith(" id=abfakecd")

    log = tmp_path / "nginx-access.log"
    entry = {**ACCESS, "uri": "/v1/models?key=secret", "request_id": "x\u0085y"}
    log.write_bytes((json.dumps(entry, ensure_ascii=False) + "\n" + "plain \u0085 line\n").encode())
    first, second = stack_logs.tail(log, 10)
    assert "secret" not in first and first.endswith("id=x?y") and " /v1/models " in first
    assert second == "plain \u0085 line"
