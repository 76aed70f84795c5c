"""A tritonserver whose rows never end by themselves, for tests that need a row still running
when they act: each model writes past its end-of-sequence (IGNORE_EOS) and may be asked for
``LONG`` tokens, more than any machine writes in a test's time. Such a test ends the row itself
(cancels it) and reads what happened from the engine's own trace (``ROW_TRACE_FILE``), never
from a timer or a gauge's timing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import start_triton

LONG = 200_000  # tokens a never-ending row asks for (the tiny LLaVA writes ~750/s here)
LONG_MODELS = ["llava", "kosmos2", "qwen3-vl"]
HANG_S = 300  # only a guard against a broken build hanging the suite; no verdict depends on it


class Trace:
    """The engine's trace of ended rows (JSON lines), read by position."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self, model: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        ended = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [row for row in ended if model is None or row["model"] == model]

    def mark(self) -> float:
        """Now, on the host's monotonic clock (the engine's too): rows submitted later are new."""
        return time.monotonic()

    def wait(self, since: float, count: int = 1) -> list[dict]:
        """The first ``count`` rows submitted after ``since`` to end, in the order they ended,
        waiting for as long as that takes (the engine writes each about a second after it ends;
        rows submitted before, a model's warm-up say, are not counted)."""
        deadline = time.monotonic() + HANG_S
        while len(ended := [row for row in self.rows() if row["submitted"] >= since]) < count:
            assert time.monotonic() < deadline, f"fewer than {count} rows ended within {HANG_S} s"
            time.sleep(0.05)
        return sorted(ended, key=lambda row: row["ended"])[:count]


@pytest.fixture(scope="session")
def long_trace(tmp_path_factory) -> Trace:
    return Trace(tmp_path_factory.mktemp("trace") / "rows.jsonl")


@pytest.fixture(scope="session")
def long_triton(tiny_models_dir, long_trace):
    env = {
        "MAX_TOKENS_CAP": str(LONG),
        "IGNORE_EOS": "true",
        "KV_CACHE_TOKENS": str(LONG + 1024),  # the pool (~400 MiB a tiny model) takes a LONG row
        "STREAM_GAP_MS": "40",  # the default: heartbeats and streamed text held as in production
        "ROW_TRACE_FILE": str(long_trace.path),
    }
    models = ["llava", *(f"{m}_stream" for m in LONG_MODELS)]
    server = start_triton(tiny_models_dir, "tritonserver-long.log", models=models, env=env)
    yield server
    server.stop()
