"""Three ways to the same llava answers through port 80 (issue 19): KServe ``infer``, the OpenAI
route plain, the OpenAI route streamed. 64 requests with images at concurrency 16, every answer
64 tokens (``LLAVA_IGNORE_EOS``), one run each on a stack of its own; tokens/s and time to
first token. ``python -m benchmarks.routes`` or ``make bench`` part ``routes``."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import load
from vlm_engine.tiny.samples import PROMPTS, sample_image
from vlm_stack.config import StackConfig
from vlm_stack.procs import ephemeral_stack_env

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llava"
IMAGES = [sample_image((160 + 24 * i, 120 + 16 * i), "PNG", (30 * i, 90, 200 - 20 * i)) for i in range(8)]


async def measure(gateway: str, requests: int, concurrency: int, tokens: int) -> dict:
    import tritonclient.http.aio as tc

    kserve = tc.InferenceServerClient(gateway.split("://", 1)[-1], conn_limit=64, conn_timeout=600)
    inputs = lambda i: load.kserve_inputs(PROMPTS[i % 8], IMAGES[i % 8], tokens)  # noqa: E731
    chat = lambda i, stream: load.chat_body(MODEL, PROMPTS[i % 8], IMAGES[i % 8], tokens, stream)  # noqa: E731
    out = {}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        for i in range(2):  # warm every path
            await load.kserve_infer(kserve, MODEL, inputs(i))
            await load.openai_chat(client, gateway, chat(i, False))
            await load.openai_chat(client, gateway, chat(i, True))
        routes = {
            "KServe infer": lambda i: load.kserve_infer(kserve, MODEL, inputs(i)),
            "OpenAI plain": lambda i: load.openai_chat(client, gateway, chat(i, False)),
            "OpenAI streamed": lambda i: load.openai_chat(client, gateway, chat(i, True)),
        }
        for label, one in routes.items():
            run = await load.drive(label, concurrency, requests, one)
            summary = run.summary()
            summary["tokens_per_s"] = round(len(run.ok) * tokens / run.wall, 1)
            out[label] = summary
    await kserve.close()
    base = out["KServe infer"]["tokens_per_s"]
    out["ratios"] = {
        label: round(out[label]["tokens_per_s"] / base, 3) for label in ("OpenAI plain", "OpenAI streamed")
    }
    return out


def run(models_dir: Path, requests: int = 64, concurrency: int = 16, tokens: int = 64) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**ephemeral_stack_env(Path(tmp) / "run", models_dir), "VLM_STACK_MODE": "local"}
        env |= {"LLAVA_IGNORE_EOS": "true", "SERVED_MODELS": MODEL}
        config = StackConfig.from_env(env)
        up = subprocess.run(["./triton_start.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"stack did not start:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        try:
            started = time.perf_counter()
            out = asyncio.run(measure(f"http://127.0.0.1:{config.nginx_port}", requests, concurrency, tokens))
            out["seconds"] = round(time.perf_counter() - started, 1)
        finally:
            subprocess.run(["./triton_start.sh", "down"], cwd=ROOT, env=env, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routes", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models" / "tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.models_dir.resolve(), args.requests, args.concurrency), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
