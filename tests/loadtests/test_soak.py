"""``make soak`` in 60 s: the mixed load on a stack of its own, each fault once (a stub,
the service and tritonserver killed, nginx reloaded); no request fails outside the fault
windows, every fault heals, and the report has what the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ARTIFACTS, ROOT


def test_a_60_second_soak_with_each_fault_once(tiny_models_dir):
    if os.environ.get("E2E_STACK_URL"):
        pytest.skip("the soak starts a local stack of its own")
    out = ARTIFACTS / "soak"
    command = [sys.executable, "-m", "loadtests.soak", "--duration", "60s", "--users", "4", "--out", str(out)]
    env = {**os.environ, "VLM_MODELS_DIR": str(tiny_models_dir), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert [f["name"] for f in report["faults"]] == [
        "model stub killed (llava_stream)",
        "service killed",
        "tritonserver killed",
        "nginx reloaded",
    ]
    assert all(f["recovered_after_s"] is not None for f in report["faults"])
    assert all(f["not_ready_seen"] for f in report["faults"][:3]), "a killed process went unnoticed"
    assert report["requests"] > 100 and report["failures_outside_windows"] == []
    services = {"triton", "fastapi", "nginx", "nginx-exporter", "prometheus"}
    assert set(report["resources"]["start"]) == services == set(report["resources"]["end"])
    for usage in report["resources"]["end"].values():
        assert usage["rss_mib"] > 0 and usage["open_files"] > 0
    assert "requests sent" in (out / "soak.md").read_text()
