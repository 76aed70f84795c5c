"""VLMClient and ``python -m fastapi_app ask`` against the real tritonserver."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastapi_app.client import VLMClient
from tests.conftest import ROOT


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_client_infer_chat_and_stream(triton, scheme, png):
    url = f"http://{triton.http_url}" if scheme == "http" else f"grpc://{triton.grpc_url}"
    client = VLMClient(url)
    text = client.infer("llava", png, "What is this?", max_tokens=10, temperature=0.0)
    assert text.strip()
    answer = client.chat("llava", png, "What is this?", max_tokens=10, temperature=0.0)
    assert answer.text == text and answer.seconds > 0
    chunks = list(client.stream("llava", png, "What is this?", max_tokens=10, temperature=0.0))
    assert len(chunks) >= 2 and "".join(chunks) == text


def test_cli_ask(triton, tmp_path, jpeg):
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg)
    base = [sys.executable, "-m", "fastapi_app", "ask", "--url", f"http://{triton.http_url}", "--model", "qwen3-vl"]
    done = subprocess.run(
        [*base, "--image", str(image), "--max-tokens", "6", "What is this?"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "qwen3-vl" in done.stderr
    missing = subprocess.run(
        [*base, "--image", str(tmp_path / "nope.jpg"), "hi"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1 and missing.stderr.startswith("error:") and "nope.jpg" in missing.stderr
