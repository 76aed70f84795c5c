"""The benchmark report: targets judged from the figures, table and plots written."""

from __future__ import annotations

import json

from benchmarks.report import verdicts, write_report


def result(gain: float, identical: bool, added_p50: float, ttft_ratio: float) -> dict:
    run = {
        "concurrency": 16,
        "rps": 2.0,
        "p50_ms": 10.0,
        "p95_ms": 20.0,
        "failed": 0,
        "ttft_p50_ms": 5.0,
        "inter_chunk_ms": 1.0,
    }
    return {
        "date": "2026-11-23T00:00:00Z",
        "host": "testhost",
        "seconds": 1.0,
        "tiny": True,
        "checkpoints": ".models/tiny",
        "machine": {"cpus": 2, "platform": "linux", "python": "3.11"},
        "batching": {
            "model": "llava",
            "max_tokens": 128,
            "runs": {"batching on": [run], "batching off": [run]},
            "gain_by_concurrency": {"16": gain},
            "identical_answers": identical,
            "executions": {"batching on": {"inferences": 16, "executions": 2}},
        },
        "stack": {
            "cold_start_s": 20.0,
            "gateway": {"direct": run},
            "gateway_added_ms": {"p50": added_p50, "p95": 4.0},
            "gateway_throughput_ratio_c8": 0.9,
            "streaming": {"direct": run},
            "ttft_ratio_nginx_vs_direct": ttft_ratio,
            "seed_comparison": {"local c=1": run},
        },
    }


def test_targets_are_judged_from_the_measured_figures():
    met = [ok for *_, ok in verdicts(result(4.5, True, 2.0, 1.05))]
    assert met == [True, True, True, True]
    missed = [ok for *_, ok in verdicts(result(4.5, False, 3.5, 1.2))]
    assert missed == [False, False, False, True]
    assert verdicts(result(3.9, True, 1.0, 1.0))[0][3] is False


def test_report_files(tmp_path):
    paths = write_report(result(5.0, True, 1.0, 1.0), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == [
        "2026-11-23-testhost-p95.png",
        "2026-11-23-testhost-throughput.png",
        "2026-11-23-testhost.json",
        "2026-11-23-testhost.md",
    ]
    assert json.loads((tmp_path / "2026-11-23-testhost.json").read_text())["host"] == "testhost"
    table = (tmp_path / "2026-11-23-testhost.md").read_text()
    assert "| dynamic batching gain at concurrency 16 | 5.0x (identical answers: True) | >= 4.0x | yes |" in table
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
