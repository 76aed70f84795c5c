"""The locust load tests (loadtests/) against the whole local stack, for a few seconds.

They use the session's stack (tests/conftest.py: ``./triton_start.sh up`` on free ports,
shared with tests/e2e); ``LOADTEST_STACK_URL`` points them at a stack that is already up.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from loadtests import payloads, run
from loadtests.config import ConfigError, Settings, parse_duration, parse_weights, weighted_schedule
from loadtests.summary import brief, check_slos, slo_thresholds, summarise
from tests.conftest import ARTIFACTS, ROOT

MAIN_ENDPOINTS = {"kserve-infer", "openai-stream", "rest-chat"}


@pytest.fixture(scope="module")
def gateway(stack):
    """nginx's URL of the running stack (the session's, shared with tests/e2e)."""
    return os.environ.get("LOADTEST_STACK_URL") or stack.url


def _loadtest(gateway: str, results: Path, **settings: str) -> subprocess.CompletedProcess:
    """``python -m loadtests.run`` as ``make loadtest`` runs it: everything from the environment."""
    own = {*run.FLAGS.values(), "KSERVE_BINARY", "LOADTEST_SAMPLES", "LOADTEST_CSV_PREFIX"}
    env = {k: v for k, v in os.environ.items() if k not in own}  # only what the test sets
    env.update(HOST=gateway, RESULTS_DIR=str(results), MAX_TOKENS="8", **settings)
    return subprocess.run(
        [sys.executable, "-m", "loadtests.run"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300
    )


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mixed_run(gateway, tmp_path_factory):
    results = tmp_path_factory.mktemp("loadtest") / "mixed"
    proc = _loadtest(
        gateway,
        results,
        USERS="3",
        SPAWN_RATE="3",
        DURATION="5s",
        PROFILE="mixed",
        WEIGHTS="infer=1,stream=1,chat=1",
        CHAT_TURNS="1",  # each chat turn then clears its session: rest-chat-reset is exercised too
        SLO_P95_MS="120000",
        SLO_TTFT_P95_MS="120000",
        SLO_ERROR_RATIO="0",
        SLO_MIN_RPS="0.1",
    )
    (ARTIFACTS / "loadtest-mixed.log").write_text(proc.stdout + proc.stderr)
    return proc, results


def test_mixed_profile_run_writes_reports_and_meets_its_slos(mixed_run, gateway):
    proc, results = mixed_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "summary.md", "summary.json"):
        assert (results / name).is_file(), f"{name} missing in {sorted(p.name for p in results.iterdir())}"
    html = (results / "report.html").read_text()
    assert "kserve-infer" in html and "openai-stream" in html and "TTFT" in html
    summary = json.loads((results / "summary.json").read_text())
    assert summary["slo"]["passed"] is True and summary["slo"]["violations"] == []
    assert set(summary["slo"]["thresholds"]) == {"SLO_P95_MS", "SLO_TTFT_P95_MS", "SLO_ERROR_RATIO", "SLO_MIN_RPS"}
    # how long it runs comes first; the brief block is printed, every table is in summary.md
    # (not printed), whose path is the last line
    lines = proc.stdout.splitlines()
    host = Settings.from_env({"HOST": gateway}).host
    assert lines[0] == f"[loadtest] running 5 s with 3 users against {host}; Ctrl-C stops early"
    assert "\n".join(brief(summary)) in proc.stdout and "| endpoint |" not in proc.stdout
    assert lines[-1].endswith(str(results / "summary.md"))
    assert "## Per endpoint and model" in (results / "summary.md").read_text()


def test_mixed_profile_run_has_no_failures(mixed_run):
    _, results = mixed_run
    summary = json.loads((results / "summary.json").read_text())
    assert summary["total"]["requests"] > 0
    assert summary["total"]["failures"] == 0, summary["total"]["errors"]
    stats = _csv_rows(results / "locust_stats.csv")
    assert stats and all(row["Failure Count"] == "0" for row in stats)
    assert _csv_rows(results / "locust_failures.csv") == []


def test_mixed_profile_run_has_a_summary_row_per_endpoint(mixed_run):
    _, results = mixed_run
    summary = json.loads((results / "summary.json").read_text())
    endpoints = {row["endpoint"] for row in summary["endpoints"]}
    assert endpoints == MAIN_ENDPOINTS | {"rest-chat-reset"}
    for row in summary["endpoints"] + summary["rows"]:
        assert row["requests"] > 0 and row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"] and row["rps"] > 0
    assert {row["model"] for row in summary["rows"]} <= {"moondream2", "kosmos2", "llava", "qwen3-vl"}
    # the summary counts what locust counted (its CSV holds the final numbers)
    stats = {(row["Type"], row["Name"]): int(row["Request Count"]) for row in _csv_rows(results / "locust_stats.csv")}
    for row in summary["rows"]:
        method = "DELETE" if row["endpoint"] == "rest-chat-reset" else "POST"
        assert stats[(method, f"{row['endpoint']} {row['model']}")] == row["requests"]
    markdown = (results / "summary.md").read_text()
    for endpoint in MAIN_ENDPOINTS:
        assert f"| {endpoint} | all |" in markdown


def test_mixed_profile_run_records_time_to_first_token_and_tokens(mixed_run):
    _, results = mixed_run
    stats = _csv_rows(results / "locust_stats.csv")
    ttft = [row for row in stats if row["Type"] == "TTFT"]
    assert ttft and all(row["Name"].startswith("openai-stream ") and int(row["Request Count"]) > 0 for row in ttft)
    assert any(row["Type"] == "ITL" for row in stats)
    summary = json.loads((results / "summary.json").read_text())
    stream = next(row for row in summary["endpoints"] if row["endpoint"] == "openai-stream")
    assert stream["ttft_samples"] == sum(int(row["Request Count"]) for row in ttft)
    assert 0 < stream["ttft_p50_ms"] <= stream["p95_ms"]
    assert stream["output_tokens"] > 0 and stream["output_tokens_per_s"] > 0
    chat = next(row for row in summary["endpoints"] if row["endpoint"] == "rest-chat")
    assert chat["output_tokens"] > 0
    infer = next(row for row in summary["endpoints"] if row["endpoint"] == "kserve-infer")
    assert infer["ttft_samples"] == 0 and infer["output_tokens"] is None


def test_a_broken_threshold_fails_the_run_and_is_named(gateway, tmp_path):
    proc = _loadtest(
        gateway,
        tmp_path / "broken",
        USERS="2",
        SPAWN_RATE="2",
        DURATION="3s",
        PROFILE="stream",
        SLO_MIN_RPS="100000",
        SLO_P95_MS="0.001",
        SLO_ERROR_RATIO="0",
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SLO_MIN_RPS broken: requests/s" in proc.stderr and "< 100000" in proc.stderr
    assert "SLO_P95_MS broken: openai-stream" in proc.stderr and "> 0.001 ms" in proc.stderr
    assert "SLO_ERROR_RATIO broken" not in proc.stderr  # the requests themselves were fine
    summary = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert summary["slo"]["passed"] is False
    assert {v["slo"] for v in summary["slo"]["violations"]} == {"SLO_MIN_RPS", "SLO_P95_MS"}
    rps = next(v for v in summary["slo"]["violations"] if v["slo"] == "SLO_MIN_RPS")
    assert rps["measured"] == summary["total"]["rps"] < rps["threshold"] == 100000


# Without the stack: settings, payloads, the summary and SLO arithmetic -------------------------
def test_bad_settings_stop_the_runner_before_any_load(capsys):
    assert run.main(["--duration", "soon"]) == 2
    assert "DURATION 'soon'" in capsys.readouterr().err
    assert run.main(["--weights", "infer=1,video=2"]) == 2
    assert run.main(["--slo-p95-ms", "fast"]) == 2
    assert "SLO_P95_MS='fast' is not a number" in capsys.readouterr().err


def test_settings_parse_durations_weights_and_hosts():
    assert parse_duration("60s") == 60 and parse_duration("1m30s") == 90 and parse_duration("2") == 2
    with pytest.raises(ConfigError):
        parse_duration("0s")
    assert parse_weights("infer=2,chat=1") == {"infer": 2, "stream": 0, "chat": 1}
    with pytest.raises(ConfigError):
        parse_weights("infer=0,stream=0,chat=0")
    assert weighted_schedule({"infer": 2, "stream": 1, "chat": 1}) == ["infer", "stream", "chat", "infer"]
    settings = Settings.from_env({"HOST": "127.0.0.1:8088/", "MODELS": "llava qwen3-vl", "PROFILE": "Stream"})
    assert settings.host == "http://127.0.0.1:8088" and settings.models == ["llava", "qwen3-vl"]
    assert settings.profile == "stream" and Settings.from_env({}).host == "http://localhost"


def test_generated_images_decode_in_their_format_and_size():
    images = payloads.make_images([(64, 48), (300, 200)], ["PNG", "JPEG", "WEBP"])
    assert len(images) == 6 and len({image.data for image in images}) == 6
    for image in images:
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.format == image.fmt and f"{decoded.size[0]}x{decoded.size[1]}" == image.name.split(".")[0]
        assert image.data_url.startswith(f"data:{image.mime};base64,")


def test_kserve_json_body_follows_the_documented_tensors():
    image = payloads.make_images([(32, 32)], ["PNG"])[0]
    body = json.loads(payloads.kserve_json_body("What is this?", image, 16))
    inputs = {tensor["name"]: tensor for tensor in body["inputs"]}
    assert inputs["prompt"] == {"name": "prompt", "datatype": "BYTES", "shape": [1, 1], "data": ["What is this?"]}
    assert inputs["image"]["datatype"] == "UINT8" and inputs["image"]["shape"] == [1, len(image.data)]
    assert bytes(inputs["image"]["data"]) == image.data
    assert inputs["max_tokens"] == {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [16]}


def _entry(kind, endpoint, model, times, failures=0, tokens=0):
    return {
        "type": kind,
        "endpoint": endpoint,
        "model": model,
        "times_ms": times,
        "failures": failures,
        "errors": {"HTTP 503": failures} if failures else {},
        "output_tokens": tokens,
        "token_requests": len(times) if tokens else 0,
    }


def test_summary_arithmetic_and_slo_checks():
    samples = {
        "elapsed_s": 10.0,
        "entries": [
            _entry("POST", "kserve-infer", "llava", [float(ms) for ms in range(1, 101)], failures=1),
            _entry("POST", "openai-stream", "llava", [200.0, 400.0], tokens=30),
            _entry("TTFT", "openai-stream", "llava", [50.0, 70.0]),
            _entry("ITL", "openai-stream", "llava", [1.0, 2.0, 3.0]),
        ],
    }
    summary = summarise(samples)
    infer, stream = summary["rows"]
    assert (infer["requests"], infer["failures"], infer["rps"]) == (101, 1, 10.1)
    assert (infer["p50_ms"], infer["p95_ms"], infer["p99_ms"]) == (50.0, 95.0, 99.0)
    assert infer["output_tokens"] is None and stream["output_tokens"] == 30 and stream["output_tokens_per_s"] == 3.0
    assert (stream["ttft_p50_ms"], stream["ttft_p95_ms"], stream["itl_p50_ms"]) == (50.0, 70.0, 2.0)
    assert summary["total"]["requests"] == 103 and summary["total"]["error_ratio"] == round(1 / 103, 4)

    assert check_slos(summary, {"SLO_P95_MS": 400, "SLO_TTFT_P95_MS": 70, "SLO_MIN_RPS": 10}) == []
    broken = check_slos(summary, {"SLO_P95_MS": 300, "SLO_TTFT_P95_MS": 60, "SLO_ERROR_RATIO": 0.001})
    assert [v.slo for v in broken] == ["SLO_P95_MS", "SLO_TTFT_P95_MS", "SLO_ERROR_RATIO"]
    assert broken[0].message == "SLO_P95_MS broken: openai-stream llava p95 400 ms > 300 ms"
    no_stream = summarise({"elapsed_s": 1.0, "entries": samples["entries"][:1]})
    assert [v.measured for v in check_slos(no_stream, {"SLO_TTFT_P95_MS": 1000})] == [None]  # nothing to check


def test_slo_thresholds_come_from_the_environment_with_an_error_ratio_default():
    assert slo_thresholds({}) == {"SLO_ERROR_RATIO": 0.01}
    assert slo_thresholds({"SLO_ERROR_RATIO": "off", "SLO_MIN_RPS": "5"}) == {"SLO_MIN_RPS": 5.0}
    with pytest.raises(ConfigError):
        slo_thresholds({"SLO_P95_MS": "-1"})


def _four_model_run() -> dict:
    """Samples as a mixed run of the four models writes them (fixed, not random)."""
    models = ["moondream2", "kosmos2", "llava", "qwen3-vl"]
    entries = []
    for i, model in enumerate(models):
        slow = 1 + i  # each model its own figures
        entries += [
            _entry("POST", "kserve-infer", model, [40.0 * slow + ms for ms in range(300)], failures=i),
            _entry("POST", "openai-stream", model, [300.0 * slow + ms for ms in range(250)], tokens=250 * 32),
            _entry("TTFT", "openai-stream", model, [25.0 * slow + ms / 3 for ms in range(250)]),
            _entry("ITL", "openai-stream", model, [2.0 * slow + ms / 100 for ms in range(2000)]),
            _entry("POST", "rest-chat", model, [280.0 * slow + ms for ms in range(200)], tokens=200 * 29),
            _entry("DELETE", "rest-chat-reset", model, [3.0 + ms / 10 for ms in range(60)]),
        ]
    settings = {"host": "http://localhost", "users": 16, "duration_s": 60, "models": models, "profile": "mixed"}
    return {"elapsed_s": 60.37, "entries": entries, "settings": settings}


def test_the_terminal_gets_the_figures_read_first_in_80_columns_and_the_file_every_table(tmp_path, capsys):
    samples = _four_model_run()
    code = run.finish(tmp_path, samples, {}, "http://localhost", [sys.executable, "-m", "locust"], False)
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    block = [line for line in lines if line and not line.startswith("[loadtest]")]
    assert all(len(line) <= 80 for line in block), "\n".join(line for line in block if len(line) > 80)
    assert len(block) == 2 + 4 + 1  # a heading line, the column titles, four models, the total
    assert "| endpoint |" not in out  # the wide table stays in the file

    # the figures printed are the summary's, with each column's decimals
    summary = summarise(samples)
    rows = {row["model"]: row for row in summary["models"]} | {"total": summary["total"]}
    assert block[0] == f"{summary['total']['requests']} requests in 60.4 s, 6 failed"
    for line in block[2:]:
        name, rps, ttft_p50, ttft_p95, tokens, failures, share = line.split()
        row = rows.pop(name)
        assert rps == f"{row['rps']:.2f}" and float(rps) == pytest.approx(row["requests"] / 60.37, abs=0.005)
        assert (ttft_p50, ttft_p95) == (f"{row['ttft_p50_ms']:.0f}", f"{row['ttft_p95_ms']:.0f}")
        assert tokens == f"{row['output_tokens_per_s']:.1f}"
        assert int(failures) == row["failures"] and share == f"({100 * row['failures'] / row['requests']:.1f}%)"
    assert rows == {} and block[-1].startswith("total ")
    assert [line.split()[0] for line in block[2:-1]] == samples["settings"]["models"]  # the run's order

    # every table in summary.md, whose path is the last line printed
    assert lines[-1].endswith(str(tmp_path / "summary.md"))
    text = (tmp_path / "summary.md").read_text()
    for heading in ("## Per endpoint", "## Per model", "## Per endpoint and model"):
        assert heading in text
    assert "| p99 ms |" in text and "| ITL p95 ms |" in text and "| openai-stream | qwen3-vl |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["models"] == summary["models"]


def test_the_terminal_block_marks_what_was_not_measured_and_stays_narrow_with_long_names(tmp_path, capsys):
    long_name = "a-model-with-a-very-long-name-indeed"
    samples = {
        "elapsed_s": 2.0,
        "entries": [_entry("POST", "kserve-infer", long_name, [10.0] * 99999, failures=12345)],
    }
    lines = brief(summarise(samples))
    assert all(len(line) <= 80 for line in lines), lines
    name, _rps, ttft_p50, ttft_p95, tokens, *errors = lines[2].split()
    assert name.endswith("~") and long_name.startswith(name[:-1])  # cut, and says so
    assert (ttft_p50, ttft_p95, tokens) == ("-", "-", "-")  # KServe infer: no tokens, no TTFT
    assert errors == ["12345", "(11.0%)"]


def test_a_run_says_first_how_long_it_runs_and_how_to_stop_it():
    settings = Settings.from_env({"HOST": "127.0.0.1:8088", "USERS": "8"})
    assert run.start_line(settings, 60) == (
        "[loadtest] running 60 s with 8 users against http://127.0.0.1:8088; Ctrl-C stops early"
    )
    assert run.start_line(settings, 600).startswith("[loadtest] running 600 s (10 min) with 8 users")
