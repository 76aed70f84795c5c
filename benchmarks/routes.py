"""Three ways to the same llava answers through port 80 (issue 19): KServe ``infer``, the OpenAI
route plain, the OpenAI route streamed. 64 requests with images at concurrency 16, every answer
64 tokens (``LLAVA_IGNORE_EOS``), on a stack of its own, in interleaved rounds; tokens/s and
time to first token. ``python -m benchmarks.routes`` or ``make bench`` part ``routes``."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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


async def measure(gateway: str, requests: int, concurrency: int, tokens: int, rounds: int) -> dict:
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
        rounds_out: list[dict] = []
        for _ in range(rounds):  # interleaved: a slow moment of the shared CPU hits every route alike
            one_round = {}
            for label, one in routes.items():
                run = await load.drive(label, concurrency, requests, one)
                summary = run.summary()
                summary["tokens_per_s"] = round(len(run.ok) * tokens / run.wall, 1)
                one_round[label] = summary
            rounds_out.append(one_round)
    await kserve.close()
    for label in routes:
        runs = [r[label] for r in rounds_out]
        out[label] = {
            "tokens_per_s": [r["tokens_per_s"] for r in runs],
            "ttft_p50_ms": [r["ttft_p50_ms"] for r in runs],
            "failed": sum(r["failed"] for r in runs),
        }
    out["ratios"] = {  # the median over rounds of each round's ratio to KServe infer
        label: round(
            statistics.median(r[label]["tokens_per_s"] / r["KServe infer"]["tokens_per_s"] for r in rounds_out), 3
        )
        for label in ("OpenAI plain", "OpenAI streamed")
    }
    out["streamed_ttft_p50_ms"] = statistics.median(r["OpenAI streamed"]["ttft_p50_ms"] for r in rounds_out)
    return out


def run(
    models_dir: Path,
    requests: int = 64,
    concurrency: int = 16,
    tokens: int = 64,
    rounds: int = 5,
    extra_env: dict | None = None,
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**ephemeral_stack_env(Path(tmp) / "run", models_dir), "VLM_STACK_MODE": "local"}
        env |= {"LLAVA_IGNORE_EOS": "true", "SERVED_MODELS": MODEL, **(extra_env or {})}
        config = StackConfig.from_env(env)
        up = subprocess.run(["./triton_start.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"stack did not start:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        try:
            started = time.perf_counter()
            out = asyncio.run(measure(f"http://127.0.0.1:{config.nginx_port}", requests, concurrency, tokens, rounds))
            out["seconds"] = round(time.perf_counter() - started, 1)
        finally:
            subprocess.run(["./triton_start.sh", "down"], cwd=ROOT, env=env, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routes", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models" / "tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three routes, interleaved")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set for the stack")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    print(
        json.dumps(
            run(args.models_dir.resolve(), args.requests, args.concurrency, rounds=args.rounds, extra_env=extra),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
