"""A test run stopped by SIGTERM (a CI job cancelled, ``timeout``) still tears its fixtures
down, so the servers its tests started do not outlive it (``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD_TEST = textwrap.dedent(
    """
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    @pytest.fixture
    def server():
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        yield process
        process.terminate()
        process.wait()

    def test_runs_until_stopped(server):
        Path("{marker}").write_text(str(server.pid))
        time.sleep(600)
    """
)


def test_sigterm_tears_the_fixtures_down(tmp_path):
    marker = tmp_path / "server.pid"
    test_file = tmp_path / "test_child.py"
    test_file.write_text(CHILD_TEST.replace("{marker}", str(marker)))
    child = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(test_file)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120  # a readiness wait: the verdict never depends on it
        while not marker.exists() or not marker.read_text():
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the child run never started its test"
            time.sleep(0.05)
        server_pid = int(marker.read_text())
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    outlived = Path(f"/proc/{server_pid}").exists() and not _is_zombie(server_pid)
    if outlived:  # the failure below, without leaving it running
        os.kill(server_pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in output, output
    assert not outlived, "the fixture's server outlived the run"


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
