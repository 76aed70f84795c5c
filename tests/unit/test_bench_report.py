"""The benchmark report: targets judged from the figures, table and plots written."""

from __future__ import annotations

import json

from benchmarks.report import verdicts, write_report


def run(rps: float) -> dict:
    return {"concurrency": 16, "rps": rps, "p50_ms": 10.0, "p95_ms": 20.0, "failed": 0, "ttft_p50_ms": 5.0}


def result(infer_c16: float, ceiling_c16: float, hol_ratio: float, static_p95: float, inflight_p95: float) -> dict:
    model = {
        "triton": {
            "infer c=1": run(2.0),
            "infer c=16": run(infer_c16),
            "stream c=1": run(2.0),
            "stream c=16": run(infer_c16),
        },
        "in_process": {"c=1": run(2.0), "c=16": run(ceiling_c16)},
        "gain_infer": round(infer_c16 / 2.0, 2),
        "gain_stream": round(infer_c16 / 2.0, 2),
        "gain_in_process": round(ceiling_c16 / 2.0, 2),
        "infer_vs_stream": 1.0,
        "infer_vs_ceiling": round(infer_c16 / ceiling_c16, 3),
    }
    hol = {
        "long_tokens": 500,
        "long_seconds": 2.0,
        "short_idle_ms": 40.0,
        "short_during_ms": 40.0 * hol_ratio,
        "ratio": hol_ratio,
        "short_finished_before_long": True,
    }
    loop = {"rate": 3.0, "requests": 60, "failed": 0, "p50_s": 1.0, "ttft_p50_s": 0.1, "ttft_p95_s": 0.2}
    loop |= {"goodput_rps": 2.9, "tokens_per_s": 400.0, "mean_output_tokens": 100.0}
    return {
        "date": "2026-11-23T00:00:00Z",
        "host": "testhost",
        "seconds": 1.0,
        "tiny": True,
        "checkpoints": ".models/tiny",
        "machine": {"cpus": 2, "platform": "linux", "python": "3.11"},
        "gain": {"max_tokens": 128, "models": {"llava": model}},
        "head_of_line": {"inflight": {"llava": hol}, "static": {"llava": dict(hol, ratio=40.0)}},
        "open_loop": {
            "model": "llava",
            "seconds_per_rate": 20,
            "ttft_slo_s": 1.0,
            "runs": {"static": [dict(loop, p95_s=static_p95)], "inflight": [dict(loop, p95_s=inflight_p95)]},
            "at_rate": 3.0,
            "static_p95_s": static_p95,
            "inflight_p95_s": inflight_p95,
            "p95_ratio": round(inflight_p95 / static_p95, 3),
        },
    }


def test_targets_are_judged_from_the_measured_figures():
    met = [ok for *_, ok in verdicts(result(12.0, 13.0, 1.5, 8.0, 2.0))]
    assert met == [True, True, True, True, True]
    missed = [ok for *_, ok in verdicts(result(8.0, 13.0, 4.0, 8.0, 5.0))]
    assert missed == [False, False, True, False, False]
    assert verdicts(result(12.0, 13.0, 1.5, 4.0, 1.0))[4][3] is False, "static p95 must pass 5 s"


def test_report_files(tmp_path):
    paths = write_report(result(12.0, 13.0, 1.5, 8.0, 2.0), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == [
        "2026-11-23-testhost-p95.png",
        "2026-11-23-testhost-throughput.png",
        "2026-11-23-testhost.json",
        "2026-11-23-testhost.md",
    ]
    assert json.loads((tmp_path / "2026-11-23-testhost.json").read_text())["host"] == "testhost"
    table = (tmp_path / "2026-11-23-testhost.md").read_text()
    assert "| llava gain at concurrency 16, KServe infer | 6.0x | >= 5.0x | yes |" in table
    assert "| static | llava | 500, 2.0 | 40.0 | 60.0 | 40.0x | yes |" in table
    for png in paths[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
