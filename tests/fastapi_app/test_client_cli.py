"""VLMClient and ``python -m fastapi_app ask`` against the real tritonserver."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_cli_without_an_image_with_entities_and_streamed_with_its_timing(triton, tmp_path, png, scheme):
    """Issue 27, point 3: --image is optional (the text goes to <model>_stream, whose image is
    optional), Kosmos-2's entities are printed, and --stream keeps the timing line."""
    url = f"http://{triton.http_url}" if scheme == "http" else f"grpc://{triton.grpc_url}"
    image = tmp_path / "photo.png"
    image.write_bytes(png)

    def ask(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fastapi_app", "ask", "--url", url, "--max-tokens", "6", *args]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)

    plain = ask("--model", "llava", "hi")
    assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr
    assert "(llava, " in plain.stderr and "entities" not in plain.stdout
    grounded = ask("--model", "kosmos2", "--image", str(image), "An image of")
    assert grounded.returncode == 0, grounded.stderr
    (line,) = [line for line in grounded.stdout.splitlines() if line.startswith("entities: ")]
    assert isinstance(json.loads(line.removeprefix("entities: ")), list)
    streamed = ask("--model", "kosmos2", "--image", str(image), "--stream", "An image of")
    assert streamed.returncode == 0 and "(kosmos2, " in streamed.stderr, streamed.stderr
    assert streamed.stdout.splitlines()[0] == grounded.stdout.splitlines()[0]  # greedy: the same answer
    assert any(line.startswith("entities: ") for line in streamed.stdout.splitlines())
