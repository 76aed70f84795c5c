"""``make bench``: serving figures measured side by side in one run, on this machine.

Starts what it needs (tritonserver with the in-flight and the static scheduler, the engine
in this process, the local stack through nginx, the FastAPI service with the in-process
engine), drives them with the same requests, and writes
``benchmarks/results/<date>-<host>.json``, ``.md`` and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks import kv_memory, load, peer, routes, scheduling
from benchmarks.report import write_report
from loadtests import payloads
from loadtests.burst import burst, refusal_figures
from vlm_engine.tiny.samples import PROMPTS, sample_image
from vlm_stack.config import StackConfig
from vlm_stack.procs import ApiProcess, ephemeral_stack_env

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "llava"
IMAGES = [sample_image((160 + 24 * i, 120 + 16 * i), "PNG", (30 * i, 90, 200 - 20 * i)) for i in range(8)]


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def request_inputs(i: int, max_tokens: int) -> list:
    return load.kserve_inputs(PROMPTS[i % 8], IMAGES[i % 8], max_tokens)


def triton_client(url: str):
    import tritonclient.http.aio as tc

    return tc.InferenceServerClient(url.split("://", 1)[-1], conn_limit=64, conn_timeout=600)


def stack_env(models_dir: Path, run_dir: Path) -> dict[str, str]:
    return {**ephemeral_stack_env(run_dir, models_dir), "VLM_STACK_MODE": "local"}


async def gateway_and_streaming(c: StackConfig, requests: int) -> dict:
    gateway = f"http://127.0.0.1:{c.nginx_port}"
    triton = f"http://127.0.0.1:{c.triton_http_port}"
    api = f"http://127.0.0.1:{c.api_port}"
    out = {}
    direct = triton_client(triton)
    async with httpx.AsyncClient(timeout=600) as client:
        direct_body = lambda i: request_inputs(i, 8)  # noqa: E731
        chat = lambda i, stream: load.chat_body(MODEL, PROMPTS[i % 8], IMAGES[i % 8], 8, stream)  # noqa: E731
        for _ in range(3):  # warm every path
            await load.kserve_infer(direct, MODEL, direct_body(0))
            await load.openai_chat(client, gateway, chat(0, False))
        runs = {
            "Triton direct (KServe infer)": await load.drive(
                "direct", 1, requests, lambda i: load.kserve_infer(direct, MODEL, direct_body(i))
            ),
            "FastAPI direct (/v1, no nginx)": await load.drive(
                "api", 1, requests, lambda i: load.openai_chat(client, api, chat(i, False))
            ),
            "nginx -> FastAPI -> Triton (/v1)": await load.drive(
                "gateway", 1, requests, lambda i: load.openai_chat(client, gateway, chat(i, False))
            ),
            "Triton direct c=8": await load.drive(
                "direct c8", 8, 4 * requests // 3, lambda i: load.kserve_infer(direct, MODEL, direct_body(i))
            ),
            "nginx -> FastAPI -> Triton c=8": await load.drive(
                "gateway c8", 8, 4 * requests // 3, lambda i: load.openai_chat(client, gateway, chat(i, False))
            ),
        }
        out["gateway"] = {k: v.summary() for k, v in runs.items()}
        g, d = out["gateway"]["nginx -> FastAPI -> Triton (/v1)"], out["gateway"]["Triton direct (KServe infer)"]
        out["gateway_added_ms"] = {
            "p50": round(g["p50_ms"] - d["p50_ms"], 2),
            "p95": round(g["p95_ms"] - d["p95_ms"], 2),
        }
        out["gateway_throughput_ratio_c8"] = round(
            out["gateway"]["nginx -> FastAPI -> Triton c=8"]["rps"] / out["gateway"]["Triton direct c=8"]["rps"], 3
        )

        def body(i: int) -> dict:
            return {"prompt": PROMPTS[i % 8], "image": list(IMAGES[i % 8]), "max_tokens": 64, "temperature": 0.0}

        streams = {}
        for base in (triton, gateway):  # warm both streaming paths
            await load.generate_stream(client, base, f"{MODEL}_stream", body(0))
        for label, base in (("direct", triton), ("through nginx", gateway)):
            streams[label] = await load.drive(
                label, 1, requests, lambda i, base=base: load.generate_stream(client, base, f"{MODEL}_stream", body(i))
            )
        out["streaming"] = {k: v.summary() for k, v in streams.items()}
        d, n = out["streaming"]["direct"], out["streaming"]["through nginx"]
        out["ttft_ratio_nginx_vs_direct"] = round(n["ttft_p50_ms"] / d["ttft_p50_ms"], 3)
    await direct.close()
    return out


async def seed_comparison(triton_api: str, local_api: str, requests: int) -> dict:
    out = {}
    async with httpx.AsyncClient(timeout=600) as client:
        chat = lambda i: load.chat_body(MODEL, PROMPTS[i % 8], IMAGES[i % 8], 64, False)  # noqa: E731
        for label, base in (
            ("in-process engine (INFERENCE_BACKEND=local)", local_api),
            ("Triton with batching (INFERENCE_BACKEND=triton)", triton_api),
        ):
            await load.openai_chat(client, base, chat(0))
            for c in (1, 8):
                run = await load.drive(
                    label, c, max(requests, 3 * c), lambda i, base=base: load.openai_chat(client, base, chat(i))
                )
                out[f"{label} c={c}"] = run.summary()
                say(f"seed: {label} c={c}: {out[f'{label} c={c}']}")
    return out


def start_local_api(models_dir: Path, log: Path) -> ApiProcess:
    env = {
        "INFERENCE_BACKEND": "local",
        "LOCAL_MODELS": MODEL,
        "SERVED_MODELS": MODEL,
        "VLM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
        "HISTORY_DB": str(log.parent / "h.db"),
    }
    return ApiProcess(log, env).start()


def overload_bursts(gateway: str) -> dict:
    """300 requests for one model sent at once through nginx, on the OpenAI route and on
    KServe infer: how many are refused (503 at the door) and how fast."""
    image = payloads.Picture("160x120.png", "PNG", IMAGES[0])
    chat = load.chat_body(MODEL, PROMPTS[0], IMAGES[0], 8, False)
    out = {"openai": refusal_figures(burst(gateway, "/v1/chat/completions", chat))}
    time.sleep(5)  # the answered ones finish
    kserve = payloads.kserve_json_body(PROMPTS[0], image, 8)
    out["kserve"] = refusal_figures(burst(gateway, f"/v2/models/{MODEL}/infer", kserve))
    time.sleep(5)
    return out


def measure_stack(models_dir: Path, requests: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = stack_env(models_dir, Path(tmp) / "run")
        config = StackConfig.from_env(env)
        start = time.perf_counter()
        up = subprocess.run(["./triton_start.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True)
        if up.returncode != 0:
            raise SystemExit(f"stack did not start:\n{up.stdout}\n{up.stderr}")
        gateway = f"http://127.0.0.1:{config.nginx_port}"
        body = load.chat_body(MODEL, PROMPTS[0], IMAGES[0], 8, False)
        answer = httpx.post(gateway + "/v1/chat/completions", json=body, timeout=120)
        cold = time.perf_counter() - start
        assert answer.status_code == 200, answer.text
        say(f"cold start (stack up to first answer through nginx): {cold:.1f}s")
        try:
            out = {"cold_start_s": round(cold, 2)}
            out.update(asyncio.run(gateway_and_streaming(config, requests)))
            say(f"gateway: {out['gateway_added_ms']}, streaming TTFT ratio {out['ttft_ratio_nginx_vs_direct']}")
            out["overload"] = overload_bursts(gateway)
            say(f"overload (300 at once): {out['overload']}")
            local_api = start_local_api(models_dir, Path(tmp) / "local-api.log")
            try:
                out["seed_comparison"] = asyncio.run(
                    seed_comparison(f"http://127.0.0.1:{config.api_port}", local_api.url, requests)
                )
            finally:
                local_api.stop()
        finally:
            subprocess.run(["./triton_start.sh", "down"], cwd=ROOT, env=env, capture_output=True, text=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / ".models" / "tiny")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (batching gain)")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (batching gain)")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--rates", default="2,3,4,5,6,7,8,10", help="open loop: arrivals per second, tried in order")
    parser.add_argument("--open-loop-seconds", type=float, default=30.0, help="open loop: arrivals per rate")
    parser.add_argument("--long-tokens", type=int, default=1024, help="head-of-line: the long answer's max_tokens")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts: kv, gain, head_of_line, open_loop, stack, routes, peer (default: all)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.models_dir / MODEL).exists():
        raise SystemExit(f"no {MODEL} checkpoint in {args.models_dir}: run `make tiny-models` (or pass --models-dir)")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    started = time.perf_counter()
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "checkpoints": str(args.models_dir),
        "tiny": (args.models_dir / MODEL / "tiny.json").exists(),
    }
    parts = set(filter(None, args.only.split(","))) or {
        "kv",
        "gain",
        "head_of_line",
        "open_loop",
        "stack",
        "routes",
        "peer",
    }
    if "kv" in parts:
        say("the engine's KV memory: join/leave writes, peak over live, padding, pace, tokens/s vs generate")
        result["kv"] = kv_memory.measure_kv(args.models_dir, say)
    if "gain" in parts:
        say("batching gain of the four models, Triton (infer, stream) vs the engine in this process")
        result["gain"] = scheduling.measure_gain(args.models_dir, concurrencies, args.max_tokens, args.requests, say)
    if "head_of_line" in parts:
        say("head-of-line: a short request while a long answer generates, in-flight vs static")
        result["head_of_line"] = scheduling.measure_head_of_line(args.models_dir, say, args.long_tokens)
    if "open_loop" in parts:
        say("open loop: Poisson arrivals, 16 to 512 new tokens, static vs in-flight")
        rates = [float(r) for r in args.rates.split(",")]
        result["open_loop"] = scheduling.measure_open_loop(args.models_dir, rates, args.open_loop_seconds, say)
    if "stack" in parts:
        say("the stack: cold start, gateway overhead, streaming, in-process vs Triton")
        result["stack"] = measure_stack(args.models_dir, args.requests)
    if "routes" in parts:
        say("three routes to llava through port 80 at c=16: KServe infer, OpenAI plain, OpenAI streamed")
        result["routes"] = routes.run(args.models_dir.resolve())
    if "peer" in parts:
        say("vLLM's CPU build beside this stack: LLaVA and Qwen3-VL, the same load, interleaved")
        result["peer"] = peer.run(args.models_dir.resolve(), say)
    result["seconds"] = round(time.perf_counter() - started, 1)
    paths = write_report(result, args.out)
    for path in paths:
        say(f"wrote {path}")
    print(Path(paths[1]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
