"""`make notebook`, as the README says to open notebooks/triton_inference.ipynb: the target
installs JupyterLab (the notebook extra) when it is missing, and JupyterLab serves the notebook
on NOTEBOOK_PORT, on 127.0.0.1 only, with NOTEBOOK_ARGS passed through; the notebook's kernel
starts; with no stack up it says to run `make demo` first and opens the notebook anyway.
Stopping make's process group leaves nothing running, the kernel included.

No timer decides the verdict: the waits poll, and their guards only end a run that hangs (the
first run may install JupyterLab from PyPI inside `make notebook`)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from jupyter_client import BlockingKernelClient

from vlm_stack.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "notebooks/triton_inference.ipynb"
READY_GUARD_S = 900  # pip may install JupyterLab first
KERNEL_GUARD_S = 300
STOP_GUARD_S = 120
KERNEL_CHECK = """
import os
import matplotlib.pyplot, openai, tritonclient.grpc, tritonclient.http, vlm_engine.engine
print("imported", os.getcwd())
"""


def _processes() -> list[tuple[int, int, str, str]]:
    """(pid, process group, state, command line) of every process on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        found.append((int(entry.name), int(fields[2]), fields[0], cmdline))
    return found


def _left(pgid: int, runtime_dir: Path) -> list[tuple[int, str]]:
    """Live processes of make's group, and kernels (their own session) whose connection file
    lies in this test's runtime folder; zombies hold nothing and are left out."""
    return [
        (pid, cmdline)
        for pid, group, state, cmdline in _processes()
        if state != "Z" and (group == pgid or str(runtime_dir) in cmdline)
    ]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* write them) listening on ``port``."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                addresses.add(address)
    return addresses


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:] if log.exists() else ""


@pytest.mark.timeout(READY_GUARD_S + KERNEL_GUARD_S + 2 * STOP_GUARD_S)
def test_make_notebook_serves_the_notebook_and_stops_clean(tmp_path):
    port, no_stack_port = free_port(), free_port()
    token = secrets.token_hex(16)
    runtime_dir = tmp_path / "runtime"
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(
        # this run's own Jupyter folders: no user config changes it, nothing is left in $HOME
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(runtime_dir),
        IPYTHONDIR=str(tmp_path / "ipython"),
        # nothing listens there: the target says to run `make demo` first
        VLM_GATEWAY=f"http://127.0.0.1:{no_stack_port}",
    )
    log = tmp_path / "make-notebook.log"
    command = [
        "make",
        "notebook",
        f"PYTHON={sys.executable}",
        f"NOTEBOOK_PORT={port}",
        f"NOTEBOOK_ARGS=--no-browser --IdentityProvider.token={token}",
    ]
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"token {token}"}
    with log.open("wb") as out:
        make = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    pgid = make.pid
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=30) as client:
            deadline = time.monotonic() + READY_GUARD_S
            while True:
                assert make.poll() is None, f"make notebook exited with {make.returncode}:\n{_log_tail(log)}"
                assert time.monotonic() < deadline, f"no answer on {base} in {READY_GUARD_S} s:\n{_log_tail(log)}"
                try:  # JupyterLab listens once it is ready: its first answer is the verdict
                    answer = client.get(f"/api/contents/{NOTEBOOK}", params={"content": 0}, headers=auth)
                    break
                except httpx.TransportError:
                    time.sleep(0.5)

            assert answer.status_code == 200, f"{answer.status_code} {answer.text[:300]}\n{_log_tail(log)}"
            model = answer.json()
            assert (model["type"], model["path"]) == ("notebook", NOTEBOOK), model
            # a new client: this one holds the login cookie of the first answer
            without_token = httpx.get(f"{base}/api/contents/{NOTEBOOK}", params={"content": 0}, trust_env=False)
            assert without_token.status_code == 403, "the token from NOTEBOOK_ARGS is required"
            lab = client.get("/lab", headers=auth)
            assert lab.status_code == 200 and "jupyter-config-data" in lab.text, lab.text[:500]
            assert client.get(f"/lab/tree/{NOTEBOOK}", headers=auth).status_code == 200
            assert _listening_addresses(port) == {"0100007F"}, "JupyterLab listens on 127.0.0.1 only"

            # the notebook's kernel (python3, ipykernel), started as the lab does on opening it (a
            # session: the kernel runs in the notebook's folder), imports what the notebook does
            session = client.post(
                "/api/sessions",
                json={"path": NOTEBOOK, "type": "notebook", "name": "", "kernel": {"name": "python3"}},
                headers=auth,
            )
            assert session.status_code == 201, session.text
            kernel_id = session.json()["kernel"]["id"]
            shell = BlockingKernelClient(connection_file=str(runtime_dir / f"kernel-{kernel_id}.json"))
            shell.load_connection_file()
            shell.start_channels()
            printed: list[str] = []
            try:
                shell.wait_for_ready(timeout=KERNEL_GUARD_S)
                reply = shell.execute_interactive(
                    KERNEL_CHECK,
                    timeout=KERNEL_GUARD_S,
                    output_hook=lambda message: printed.append(message["content"].get("text", "")),
                )
            finally:
                shell.stop_channels()
            assert reply["content"]["status"] == "ok", reply["content"]
            assert "".join(printed).split() == ["imported", str(ROOT / "notebooks")], printed
            assert any(kernel_id in cmdline for _, cmdline in _left(pgid, runtime_dir)), "the kernel's process"

        output = log.read_text(errors="replace")
        assert "run make demo first" in output and f"127.0.0.1:{no_stack_port}" in output, output[-3000:]
    finally:
        # stop the whole group, as Ctrl-C in a terminal would (make, JupyterLab, a pip still installing)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            make.wait(STOP_GUARD_S)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + STOP_GUARD_S
        while (left := _left(pgid, runtime_dir)) and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid, _ in left:  # fail below, but leave nothing running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if make.poll() is None:
            make.wait()
    assert not left, f"still running after SIGTERM to make's process group: {left}\n{_log_tail(log)}"
