"""supervisord for the local stack: it starts every service, restarts any that dies (with
back-off and a line in ``supervisord.log``), and answers over XML-RPC on a unix socket.

The socket asks for a username and password, generated when supervisord starts and kept in
the rendered config (mode 0600), which ``Supervisor`` and ``supervisorctl -c`` read; as root
the config names ``user=root``. Without either, supervisord logs a CRIT line for each on
every start (supervisor/options.py, supervisor/http.py), which reads like a failure.
"""

from __future__ import annotations

import configparser
import os
import secrets
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

# The program states supervisord reports (supervisor.states.ProcessStates)
RUNNING, BACKOFF, FATAL = "RUNNING", "BACKOFF", "FATAL"


@dataclass
class Program:
    name: str
    command: list[str]
    env: dict[str, str]  # what differs from supervisord's own environment
    stop_seconds: int = 30


def _quote(value: str) -> str:
    """A value for supervisord's ``environment=`` (its ``%`` expansion and quoting)."""
    return '"' + value.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"') + '"'


def _argument(value: str) -> str:
    """One command-line argument for supervisord's ``command=`` (shlex-split, ``%`` expanded)."""
    value = value.replace("%", "%%")
    return value if value and not any(c in value for c in " \t'\"\\;") else '"' + value.replace('"', '\\"') + '"'


def new_credentials() -> tuple[str, str]:
    """A username and password for supervisord's socket (plain text in the 0600 config)."""
    return "vlm", secrets.token_hex(16)


def render(run_dir: Path, programs: list[Program], cwd: Path, auth: tuple[str, str] | None = None) -> str:
    """supervisord's config; ``auth``: the socket's (username, password), None: none asked."""
    logs = run_dir / "logs"
    credentials = [f"username={auth[0]}", f"password={auth[1]}"] if auth else []
    lines = [
        "[supervisord]",
        f"logfile={logs / 'supervisord.log'}",
        f"pidfile={run_dir / 'pids' / 'supervisord.pid'}",
        f"childlogdir={logs}",
        "loglevel=info",
        # as root: say so (without user=, supervisord logs "CRIT Supervisor is running as root")
        *(["user=root"] if os.getuid() == 0 else []),
        "",
        "[unix_http_server]",
        f"file={run_dir / 'supervisor.sock'}",
        "chmod=0700",
        *credentials,
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{run_dir / 'supervisor.sock'}",
        *credentials,
    ]
    for program in programs:
        lines += [
            "",
            f"[program:{program.name}]",
            "command=" + " ".join(_argument(a) for a in program.command),
            f"directory={cwd}",
            # started in order by ``up``, each once the previous one is healthy
            "autostart=false",
            # any exit restarts it; exits within startsecs are retried with growing back-off
            "autorestart=true",
            "startsecs=3",
            "startretries=20",
            "stopsignal=TERM",
            f"stopwaitsecs={program.stop_seconds}",
            "stopasgroup=true",
            "killasgroup=true",
            f"stdout_logfile={logs / (program.name + '.log')}",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
            "redirect_stderr=true",
        ]
        if program.env:
            lines.append("environment=" + ",".join(f"{k}={_quote(v)}" for k, v in sorted(program.env.items())))
    return "\n".join(lines) + "\n"


class PasswordRefused(SystemExit):
    """supervisord answered 401: the config on disk is not the one it started with."""


class Supervisor:
    """The stack's supervisord: started once by ``up``, shut down by ``down``."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.config = run_dir / "supervisord.conf"
        self.socket = run_dir / "supervisor.sock"
        self.pidfile = run_dir / "pids" / "supervisord.pid"

    def credentials(self) -> tuple[str, str] | None:
        """The socket's (username, password) from the rendered config; None: none asked."""
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(self.config.read_text())
        except (OSError, configparser.Error):
            return None
        username = parser.get("unix_http_server", "username", fallback=None)
        return (username, parser.get("unix_http_server", "password", fallback="")) if username else None

    def write_config(self, text: str) -> None:
        """The rendered config, readable by this user only (it holds the socket's password),
        written whole: a reader never sees it half written."""
        self.config.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.config.with_name(f".{self.config.name}.{os.getpid()}")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left over keeps its mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(fresh, self.config)

    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        username, password = self.credentials() or (None, None)
        transport = SupervisorTransport(username, password, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return self.rpc().getState()["statename"] == "RUNNING"
        except xmlrpc.client.ProtocolError as exc:
            if exc.errcode == 401:
                raise PasswordRefused(
                    f"supervisord on {self.socket} refused the password in {self.config} (another `up` "
                    "rewrote it meanwhile?); `make down` stops it by its pid file"
                ) from exc
            return False
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self, env: dict[str, str], cwd: Path) -> None:
        """supervisord as a daemon with ``env`` (what every program inherits)."""
        if self.running():  # up again: take new programs into the running supervisord
            added, _changed, _removed = self.rpc().reloadConfig()[0]
            for name in added:
                self.rpc().addProcessGroup(name)
            return
        command = [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.config)]
        subprocess.run(command, cwd=cwd, env=env, check=True)
        deadline = time.monotonic() + 20
        while not self.running():
            if time.monotonic() > deadline:
                raise SystemExit(f"supervisord did not start; see {self.run_dir / 'logs' / 'supervisord.log'}")
            time.sleep(0.1)

    def info(self, name: str) -> dict | None:
        if not self.running():
            return None
        try:
            return self.rpc().getProcessInfo(name)
        except xmlrpc.client.Fault:
            return None

    def programs(self) -> list[str]:
        """The names of the programs the running supervisord has, in its order."""
        if not self.running():
            return []
        try:
            return [info["name"] for info in self.rpc().getAllProcessInfo()]
        except (OSError, xmlrpc.client.Fault):
            return []

    def pid(self, name: str) -> int | None:
        info = self.info(name)
        return info["pid"] if info and info["statename"] in (RUNNING, "STARTING") and info["pid"] else None

    def start_program(self, name: str) -> None:
        info = self.info(name)
        if info and info["statename"] in (RUNNING, "STARTING", BACKOFF):
            return
        self.rpc().startProcess(name, False)

    def shutdown(self, timeout_s: float = 90) -> None:
        """Stop every program (each within its stop timeout), then supervisord itself."""
        try:
            up = self.running()
        except PasswordRefused:  # ours (its pid file) but not answering this config: SIGTERM stops it all
            self._terminate_by_pidfile(timeout_s)
            return
        if not up:
            self.pidfile.unlink(missing_ok=True)
            return
        self.rpc().stopAllProcesses(True)
        self.rpc().shutdown()
        deadline = time.monotonic() + timeout_s
        while self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pidfile.unlink(missing_ok=True)

    def _terminate_by_pidfile(self, timeout_s: float) -> None:
        """SIGTERM to the supervisord of this run folder's pid file (it stops its programs first)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + timeout_s
        while self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pidfile.unlink(missing_ok=True)
