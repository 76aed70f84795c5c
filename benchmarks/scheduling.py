"""Scheduling figures: the batching gain of all four models against their in-process
ceiling, head-of-line blocking, and an open-loop (Poisson) run of in-flight vs static.

Requests go over gRPC (tritonclient.grpc.aio): KServe ``infer`` to the face ``<model>``,
or a stream to ``<model>_stream`` (time to first token). The in-process ceiling runs the
same requests through the engine in this process, with no server in between.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.load import Run, Sample, drive, pct
from vlm_engine.tiny.samples import PROMPTS, sample_image
from vlm_stack.procs import free_ports
from vlm_triton.launch import TritonProcess

MODELS = ["llava", "qwen3-vl", "kosmos2", "moondream2"]
IMAGES = [sample_image((160 + 24 * i, 120 + 16 * i), "PNG", (30 * i, 90, 200 - 20 * i)) for i in range(8)]
Say = Callable[[str], None]


def grpc_inputs(prompt: str, image: bytes, max_tokens: int, stream: bool | None = None) -> list:
    import tritonclient.grpc.aio as tc

    arrays = [
        ("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        ("image", np.frombuffer(image, dtype=np.uint8).reshape(1, -1), "UINT8"),
        ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        ("temperature", np.array([[0.0]], dtype=np.float32), "FP32"),
    ]
    if stream is not None:
        arrays.append(("stream", np.array([[stream]], dtype=np.bool_), "BOOL"))
    tensors = []
    for name, array, dtype in arrays:
        tensor = tc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


async def face_infer(client, model: str, i: int, max_tokens: int) -> Sample:
    start = time.perf_counter()
    result = await client.infer(model, grpc_inputs(PROMPTS[i % 8], IMAGES[i % 8], max_tokens))
    return Sample(time.perf_counter() - start, text=result.as_numpy("generated_text").reshape(-1)[0].decode())


async def stream_infer(client, model: str, prompt: str, image: bytes, max_tokens: int) -> Sample:
    """One request streamed from ``<model>_stream``; TTFT is the first response with text."""
    start = time.perf_counter()

    async def requests():
        yield {
            "model_name": f"{model}_stream",
            "inputs": grpc_inputs(prompt, image, max_tokens),
            "enable_empty_final_response": True,
        }

    ttft, texts, tokens = None, [], 0
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise error
        response = result.get_response()
        if response.outputs:
            text = result.as_numpy("generated_text").reshape(-1)[0].decode()
            texts.append(text)
            if text and ttft is None:
                ttft = time.perf_counter() - start
        if response.parameters["triton_final_response"].bool_param:
            if response.outputs:
                tokens = int(result.as_numpy("output_tokens").reshape(-1)[0])
            break
    return Sample(time.perf_counter() - start, ttft, len(texts), "".join(texts), tokens=tokens)


def start_server(models_dir: Path, log: Path, models: list[str], env: dict[str, str] | None = None) -> TritonProcess:
    http, grpc, metrics = free_ports(3)
    server = TritonProcess(
        log,
        env={"VLM_MODELS_DIR": str(models_dir), "HF_HUB_OFFLINE": "1", **(env or {})},
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        models=[m for model in models for m in (model, f"{model}_stream")],
    ).start()
    server.wait_ready(300, lambda message: None)
    return server


# -- batching gain: Triton (face and stream model) and the in-process ceiling


async def _triton_gain(url: str, model: str, levels: list[int], max_tokens: int, per_level: int, say: Say) -> dict:
    import tritonclient.grpc.aio as tc

    client = tc.InferenceServerClient(url)
    out: dict = {}
    try:
        await face_infer(client, model, 0, max_tokens)  # warm
        for label, one in (
            ("infer", lambda i: face_infer(client, model, i, max_tokens)),
            ("stream", lambda i: stream_infer(client, model, PROMPTS[i % 8], IMAGES[i % 8], max_tokens)),
        ):
            for c in levels:
                run = await drive(f"{model} {label} c={c}", c, max(per_level, 4 * c), one)
                out[f"{label} c={c}"] = run.summary()
                say(f"{model} {label} c={c}: {out[f'{label} c={c}']['rps']} req/s")
    finally:
        await client.close()
    return out


def in_process(engine, concurrency: int, total: int, max_tokens: int) -> dict:
    """Closed loop on the engine itself: ``concurrency`` requests in flight, ``total`` in all."""
    from vlm_engine.chat import single_turn

    slots = threading.Semaphore(concurrency)
    finished = threading.Event()
    left = [total]
    lock = threading.Lock()
    latencies: list[float] = []

    def submit(i: int) -> None:
        start = time.perf_counter()

        def emit(event) -> None:
            if event.final:
                with lock:
                    latencies.append(time.perf_counter() - start)
                    left[0] -= 1
                    if not left[0]:
                        finished.set()
                slots.release()

        prepared = engine.prepare(single_turn(PROMPTS[i % 8], IMAGES[i % 8]), max_tokens, 0.0)
        engine.submit(prepared, emit)

    start = time.perf_counter()
    for i in range(total):
        slots.acquire()
        submit(i)
    finished.wait()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": total,
        "rps": round(total / wall, 3),
        "p50_ms": round(pct(latencies, 50) * 1000, 2),
    }


def measure_gain(models_dir: Path, levels: list[int], max_tokens: int, per_level: int, say: Say) -> dict:
    """Per model: req/s at each concurrency through KServe infer and the stream model, then
    the engine alone in this process (the ceiling), with the server stopped. Every answer
    runs to ``max_tokens`` (``IGNORE_EOS``), as random weights would stop at random."""
    from vlm_engine.engine import VLMEngine
    from vlm_engine.settings import resolve_settings

    out: dict = {"max_tokens": max_tokens, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(models_dir, Path(tmp) / "gain.log", MODELS, {"IGNORE_EOS": "true"})
        try:
            for model in MODELS:
                out["models"][model] = {
                    "triton": asyncio.run(_triton_gain(server.grpc_url, model, levels, max_tokens, per_level, say))
                }
        finally:
            server.stop()
    for model in MODELS:
        engine = VLMEngine(resolve_settings(model, env={"VLM_MODELS_DIR": str(models_dir), "IGNORE_EOS": "true"}))
        try:
            ceiling = {f"c={c}": in_process(engine, c, max(per_level, 4 * c), max_tokens) for c in levels}
        finally:
            engine.close()
        entry = out["models"][model]
        entry["in_process"] = ceiling
        low, high = f"c={levels[0]}", f"c={levels[-1]}"
        triton = entry["triton"]
        entry["gain_infer"] = round(triton[f"infer {high}"]["rps"] / triton[f"infer {low}"]["rps"], 2)
        entry["gain_stream"] = round(triton[f"stream {high}"]["rps"] / triton[f"stream {low}"]["rps"], 2)
        entry["gain_in_process"] = round(ceiling[high]["rps"] / ceiling[low]["rps"], 2)
        entry["infer_vs_stream"] = round(triton[f"infer {high}"]["rps"] / triton[f"stream {high}"]["rps"], 3)
        entry["infer_vs_ceiling"] = round(triton[f"infer {high}"]["rps"] / ceiling[high]["rps"], 3)
        say(
            f"{model}: gain {entry['gain_infer']}x via infer, {entry['gain_stream']}x via the stream model, "
            f"{entry['gain_in_process']}x in process; infer reaches {entry['infer_vs_ceiling']:.0%} of the ceiling"
        )
    return out


# -- head-of-line blocking


async def _allowed_tokens(client, model: str, wanted: int) -> int:
    """``wanted``, or the most the model allows when its limits say less (moondream2's tiny
    stand-in has a 512-position context: its 400 says the largest max_tokens that fits)."""
    try:
        await stream_infer(client, model, PROMPTS[0], IMAGES[0], wanted)
        return wanted
    except Exception as exc:
        limit = re.search(r"at most (\d+)|between 1 and (\d+)", str(exc))
        if limit is None:
            raise
        return min(wanted, int(limit.group(1) or limit.group(2))) - 8  # room for longer prompts


async def _head_of_line(url: str, model: str, long_tokens: int, short_tokens: int, say: Say) -> dict:
    import tritonclient.grpc.aio as tc

    client = tc.InferenceServerClient(url)
    try:
        short = (PROMPTS[3], IMAGES[3])
        await stream_infer(client, model, *short, short_tokens)  # warm
        idle = [(await stream_infer(client, model, *short, short_tokens)).seconds for _ in range(5)]
        long_tokens = await _allowed_tokens(client, model, long_tokens)
        candidates = []
        for i in (0, 1, 2, 4, 5, 6, 7):  # the sample that runs longest
            sample = await stream_infer(client, model, PROMPTS[i], IMAGES[i], long_tokens)
            candidates.append((sample.tokens, i))
            if sample.tokens >= long_tokens:
                break
        long_len, index = max(candidates)
        started = time.perf_counter()
        task = asyncio.create_task(stream_infer(client, model, PROMPTS[index], IMAGES[index], long_tokens))
        await asyncio.sleep(0.2)  # the long answer is generating
        during, first_done = [], None
        while not task.done() and len(during) < 3:  # short requests sent while it runs
            during.append((await stream_infer(client, model, *short, short_tokens)).seconds)
            first_done = first_done or time.perf_counter()
        long = await task
        long_done = started + long.seconds
    finally:
        await client.close()
    out = {
        "long_tokens": long_len,
        "long_seconds": round(long.seconds, 3),
        "short_idle_ms": round(statistics.median(idle) * 1000, 1),
        "short_during_ms": round(statistics.median(during) * 1000, 1),
        "short_finished_before_long": first_done is not None and first_done < long_done,
    }
    out["ratio"] = round(out["short_during_ms"] / out["short_idle_ms"], 2)
    say(f"head-of-line {model}: {out}")
    return out


def measure_head_of_line(models_dir: Path, say: Say, long_tokens: int = 1024, short_tokens: int = 8) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("inflight", "static"):
            env = {"SCHEDULER": policy}
            server = start_server(models_dir, Path(tmp) / f"hol-{policy}.log", MODELS, env)
            try:
                out[policy] = {
                    model: asyncio.run(_head_of_line(server.grpc_url, model, long_tokens, short_tokens, say))
                    for model in MODELS
                }
            finally:
                server.stop()
    return out


# -- open loop: Poisson arrivals, mixed output lengths, in-flight vs static


async def _open_loop(url: str, model: str, rate: float, seconds: float, seed: int) -> Run:
    import tritonclient.grpc.aio as tc

    rng = random.Random(seed)
    client = tc.InferenceServerClient(url)
    tasks = []
    start = time.perf_counter()
    try:
        await stream_infer(client, model, PROMPTS[0], IMAGES[0], 4)  # warm
        start = time.perf_counter()
        at = 0.0
        i = 0
        while at < seconds:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            max_tokens = round(16 * 32 ** rng.random())  # 16 to 512, log-uniform
            tasks.append(
                asyncio.create_task(_safe(stream_infer(client, model, PROMPTS[i % 8], IMAGES[i % 8], max_tokens)))
            )
            i += 1
            at += rng.expovariate(rate)
        samples = await asyncio.gather(*tasks)
    finally:
        await client.close()
    return Run(f"{rate}/s", 0, time.perf_counter() - start, list(samples))


async def _safe(call) -> Sample:
    try:
        return await call
    except Exception as exc:
        return Sample(0.0, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])


def open_loop_summary(run: Run, rate: float, ttft_slo: float) -> dict:
    ok = run.ok
    latency = sorted(s.seconds for s in ok)
    ttft = sorted(s.ttft for s in ok if s.ttft is not None)
    tokens = sum(s.tokens for s in ok)
    good = [s for s in ok if s.ttft is not None and s.ttft <= ttft_slo]
    return {
        "rate": rate,
        "requests": len(run.samples),
        "failed": len(run.samples) - len(ok),
        "p50_s": round(pct(latency, 50), 3),
        "p95_s": round(pct(latency, 95), 3),
        "ttft_p50_s": round(pct(ttft, 50), 3),
        "ttft_p95_s": round(pct(ttft, 95), 3),
        "tokens_per_s": round(tokens / run.wall, 1),
        "goodput_rps": round(len(good) / run.wall, 3),
        "mean_output_tokens": round(tokens / max(len(ok), 1), 1),
    }


def measure_open_loop(
    models_dir: Path, rates: list[float], seconds: float, say: Say, model: str = "llava", ttft_slo: float = 1.0
) -> dict:
    """Static first, rate by rate, until its p95 has passed 5 s (and one rate more); then
    in-flight at the same rates. The comparison is at the first rate where static passes 5 s."""
    out: dict = {"model": model, "seconds_per_rate": seconds, "ttft_slo_s": ttft_slo, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("static", "inflight"):
            prefix = model.upper().replace("-", "_")
            # IGNORE_EOS: random weights stop early at random; every answer runs to its max_tokens
            env = {f"{prefix}_SCHEDULER": policy, f"{prefix}_IGNORE_EOS": "true", "MAX_WAITING": "4096"}
            server = start_server(models_dir, Path(tmp) / f"open-{policy}.log", [model], env)
            runs = []
            try:
                for rate in rates if policy == "static" else [r["rate"] for r in out["runs"]["static"]]:
                    run = asyncio.run(_open_loop(server.grpc_url, model, rate, seconds, seed=int(rate * 1000)))
                    runs.append(open_loop_summary(run, rate, ttft_slo))
                    say(f"open loop {policy}: {runs[-1]}")
                    if policy == "static" and sum(r["p95_s"] > 5.0 for r in runs) == 2:
                        break  # one rate past the crossing, to show the trend

            finally:
                server.stop()
            out["runs"][policy] = runs
    crossing = next((i for i, r in enumerate(out["runs"]["static"]) if r["p95_s"] > 5.0), -1)
    static, inflight = out["runs"]["static"][crossing], out["runs"]["inflight"][crossing]
    out["at_rate"] = static["rate"]
    out["static_p95_s"] = static["p95_s"]
    out["inflight_p95_s"] = inflight["p95_s"]
    out["p95_ratio"] = round(inflight["p95_s"] / static["p95_s"], 3)
    return out
