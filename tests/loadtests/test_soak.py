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


def test_a_stub_that_dies_by_itself_is_an_unplanned_fault_apart_from_the_injected_ones(tmp_path):
    from loadtests.soak import Fault, unplanned_faults, watchdog_events

    log = tmp_path / "triton.log"
    log.write_text(
        'I1201 22:25:23.400000 1 model_lifecycle.cc:472] "loading: x"\n'
        "2026-12-01 22:25:23,485 vlm_triton.serve WARNING model llava_stream: stub process 30035 died; reloading it\n"
        "2026-12-01 22:25:29,570 vlm_triton.serve WARNING model llava_stream: reloaded in 6.1 s\n"
        "malloc(): unaligned fastbin chunk detected\n"
        "2026-12-01 22:31:59,814 vlm_triton.serve WARNING model kosmos2: stub process 30986 died; reloading it\n"
        "2026-12-01 22:32:01,281 vlm_triton.serve WARNING model kosmos2: reloaded in 1.5 s\n"
    )
    events = watchdog_events(log)
    assert [(m, k) for m, _, k in events] == [
        ("llava_stream", "died"),
        ("llava_stream", "reloaded"),
        ("kosmos2", "died"),
        ("kosmos2", "reloaded"),
    ]
    injected = Fault("model stub killed (llava_stream)", at=events[0][1] - 0.1, recovered_after_s=6.2)
    (unplanned,) = unplanned_faults(events, [injected])
    assert unplanned[0] == "kosmos2" and round(unplanned[2] - unplanned[1], 3) == 1.467
