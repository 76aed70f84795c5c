"""Stub clean-up touches only this stack's processes (issue 19): a stub-like process whose
server is gone is killed only when its environment carries this stack's mark; another
Triton's stub (PyTriton, an embedded server, a second deployment) survives."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from vlm_triton import launch
from vlm_triton.serve import STUB, kill_orphan_stubs

GONE = "999999"  # the 6th argument: a server pid that does not exist


def fake_stub(tmp_path, env: dict[str, str]) -> subprocess.Popen:
    """A process whose command line looks like a Python-backend stub of a dead server."""
    args = [str(tmp_path / STUB), "-c", "import time; time.sleep(120)", "model", "1", GONE]
    return subprocess.Popen(args, executable=sys.executable, env=env)


def test_only_this_stacks_orphan_stubs_are_killed(tmp_path):
    mark = f"test-{os.getpid()}"
    ours = fake_stub(tmp_path, {**os.environ, launch.MARKER: mark})
    other = fake_stub(tmp_path, {k: v for k, v in os.environ.items() if k != launch.MARKER})
    another_stack = fake_stub(tmp_path, {**os.environ, launch.MARKER: mark + "-elsewhere"})
    try:
        time.sleep(0.5)  # their command lines are in /proc
        killed = kill_orphan_stubs(mark)
        assert ours.pid in killed
        assert other.pid not in killed and another_stack.pid not in killed
        assert ours.wait(timeout=10) == -9
        assert other.poll() is None and another_stack.poll() is None
    finally:
        for process in (ours, other, another_stack):
            process.kill()
            process.wait()


def test_tritonserver_gets_the_mark():
    assert launch.environment({})[launch.MARKER] == launch.marker()
