"""KV-memory figures of the engine in this process (issue 17): what a join and a leave
write, peak over live memory during a join, padding waste, a watcher stream's pace while
long prompts join, and tokens/s against the bare model's batched ``generate``.

``python -m benchmarks.kv_memory`` (or ``make bench`` with ``--only kv``) prints JSON.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks import neighbour
from benchmarks.load import pct
from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.settings import resolve_settings
from vlm_engine.tiny.samples import PROMPTS, sample_image

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [sample_image((160 + 24 * i, 120 + 16 * i), "PNG", (30 * i, 90, 200 - 20 * i)) for i in range(8)]


def engine(models_dir: Path, model: str = "llava", **env: str) -> VLMEngine:
    """An engine in this process; its request inputs made here unless ``PREPARE_WORKERS`` is
    given (the bare ``generate`` batches the decoded images that preparing keeps here)."""
    env = {"VLM_MODELS_DIR": str(models_dir), "PREPARE_WORKERS": "0", **env}
    return VLMEngine(resolve_settings(model, env=env))


def prepare(e: VLMEngine, i: int, max_tokens: int, prompt: str | None = None):
    return e.prepare(single_turn(prompt or PROMPTS[i % 8], IMAGES[i % 8]), max_tokens, 0.0)


def join_and_leave(models_dir: Path, rows: int = 16) -> dict:
    """Bytes written by one join and one leave, relative to the KV of the rows concerned."""
    e = engine(models_dir, WARMUP="false", MAX_RUNNING=str(rows + 1))
    try:
        adapter, kv = e.adapter, e.adapter.kv
        per_token = kv.shape.bytes_per_token
        seqs = [adapter.start(prepare(e, i, 32), []) for i in range(rows)]
        for seq in seqs:
            kv.pages.grow(seq.key, seq.length + 32)
        adapter.prefill([(s, 0, s.length) for s in seqs])
        for _ in range(8):
            adapter.decode(seqs)
        live = sum(s.cached for s in seqs) * per_token
        new = adapter.start(prepare(e, rows, 32), [])
        kv.pages.grow(new.key, new.length + 32)
        before, kv.counters.largest_gather = kv.counters.written, 0
        pool_before = [(t.data_ptr(), t.numel() * t.element_size()) for t in kv.keys + kv.values]
        adapter.prefill([(new, 0, new.length)])
        pool_after = [(t.data_ptr(), t.numel() * t.element_size()) for t in kv.keys + kv.values]
        reallocated = sum(size for (ptr, size), (ptr2, _) in zip(pool_before, pool_after, strict=True) if ptr != ptr2)
        join = kv.counters.written - before
        transient = kv.counters.largest_gather
        adapter.decode([*seqs, new])  # the next step over all rows: its largest transient
        step_transient = kv.counters.largest_gather
        leaving = seqs.pop(3)
        before = kv.counters.written
        adapter.free(leaving)
        return {
            "rows": rows,
            "join_written_over_new_row_kv": round(join / (new.length * per_token), 3),
            "leave_written_bytes": kv.counters.written - before,
            "kv_bytes_allocated_by_join": reallocated,  # pool tensors replaced during the join
            "peak_over_live_during_join": round(
                (live + new.length * per_token + transient) / (live + new.length * per_token), 3
            ),
            "peak_over_live_during_next_step": round((live + step_transient) / live, 3),
            "layers": kv.shape.layers,
        }
    finally:
        e.close()


def watcher_pace(models_dir: Path, long_rows: int = 16, budget: int = 512) -> dict:
    """A watcher stream's inter-token gaps while rows with ~1500-token prompts join and leave."""
    e = engine(models_dir, IGNORE_EOS="true", PREFILL_BUDGET=str(budget), MAX_RUNNING=str(long_rows + 1))
    long_text = " ".join(PROMPTS * 8)
    try:
        stamps: list[float] = []
        done = threading.Event()

        def watch(event) -> None:
            if event.text:
                stamps.append(time.perf_counter())
            if event.final:
                done.set()

        e.submit(prepare(e, 0, 600), watch)
        while len(stamps) < 5:
            time.sleep(0.01)
        prompt_tokens = []
        finished = threading.Semaphore(0)
        for _ in range(3):
            for i in range(long_rows):
                p = prepare(e, i, 16, long_text)
                prompt_tokens.append(e.adapter.prefill_cost(p))
                e.submit(p, lambda ev: finished.release() if ev.final else None)
            for _ in range(long_rows):
                finished.acquire()
        done.wait(600)
        gaps = sorted(b - a for a, b in itertools.pairwise(stamps[5:]))
        p50, p99 = statistics.median(gaps), pct(gaps, 99)
        return {
            "prefill_budget": budget,
            "long_prompt_tokens": round(statistics.mean(prompt_tokens)),
            "gap_p50_ms": round(p50 * 1000, 2),
            "gap_p99_ms": round(p99 * 1000, 2),
            "p99_over_p50": round(p99 / p50, 2),
        }
    finally:
        e.close()


def throughput(models_dir: Path, rows: int, max_tokens: int = 64) -> dict:
    """Tokens/s of the engine at ``rows`` concurrent requests against the bare model's batched
    ``generate`` on the same requests (the same weights, every answer ``max_tokens`` long)."""
    e = engine(models_dir, IGNORE_EOS="true", MAX_RUNNING=str(rows), MAX_WAITING=str(rows))
    try:
        return against_generate(e, rows, max_tokens)
    finally:
        e.close()


def kv_heavy_throughput(models_dir: Path, rows: int, max_tokens: int = 64) -> dict:
    """The same on a random-weight LLaVA with 32x the tiny checkpoint's KV per token (16
    layers of 8 KV heads), cheap to compute: KV traffic weighs here as it does on a GPU."""
    from benchmarks import gpu_check

    folder = gpu_check.make_checkpoint("llava", "kv-heavy", models_dir, ROOT / ".models" / "kv-heavy")
    e = gpu_check.engine(folder, "llava", "cpu", "float32", WARMUP="false", MAX_RUNNING=str(rows))
    try:
        figures = against_generate(e, rows, max_tokens)
        figures["kv_bytes_per_token"] = e.adapter.kv.shape.bytes_per_token
        return figures
    finally:
        e.close()


def against_generate(e: VLMEngine, rows: int, max_tokens: int) -> dict:
    from benchmarks.peer import fresh_image

    # images no request sent before: the engine's prefix and encoder caches would skip their work
    prepared = [e.prepare(single_turn(PROMPTS[i % 8], fresh_image()), max_tokens, 0.0) for i in range(rows)]
    start = time.perf_counter()
    results = e.generate(prepared)
    engine_s = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in results)
    bare = bare_generate_tok_s(e, rows, max_tokens)  # as many new images
    adapter = e.adapter
    counters = adapter.kv.counters
    return {
        "rows": rows,
        "engine_tok_s": round(tokens / engine_s, 1),
        "generate_tok_s": round(bare, 1),
        "engine_over_generate": round((tokens / engine_s) / bare, 3),
        "padding_waste_attended_over_real": round(counters.attended_tokens / max(counters.real_tokens, 1), 3),
    }


def bare_generate_tok_s(e: VLMEngine, rows: int, max_tokens: int) -> float:
    """The bare model's batched ``generate`` on ``rows`` new images, every answer ``max_tokens`` long."""
    from benchmarks.peer import fresh_image

    adapter = e.adapter
    prepared = [e.prepare(single_turn(PROMPTS[i % 8], fresh_image()), max_tokens, 0.0) for i in range(rows)]
    batch = adapter.encode(prepared)
    with torch.inference_mode():
        start = time.perf_counter()
        out = adapter.model.generate(
            **batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=adapter.pad_id
        )
        seconds = time.perf_counter() - start
    return (out.shape[-1] - batch["input_ids"].shape[-1]) * rows / seconds


def kserve_against_generate(
    models_dir: Path, models: list[str], rows: list[int], max_tokens: int = 64, rounds: int = 3
) -> dict:
    """Tokens/s of KServe ``infer`` to Triton's ``<model>`` (gRPC, ``rows`` requests in flight,
    images no request sent before) against the bare model's batched ``generate`` on as many
    rows, in this process with as many threads as Triton's engine (``CPU_THREADS``). The two
    alternate, ``rounds`` times (this machine drifts by a quarter within minutes); the figures
    are the medians, the ratio the median of each round's."""
    import asyncio
    import statistics
    import tempfile

    import tritonclient.grpc.aio as tc

    from benchmarks.load import drive
    from benchmarks.peer import fresh_image
    from benchmarks.scheduling import grpc_inputs, start_server
    from vlm_engine.loading import cpu_threads

    async def served(url: str, model: str, count: int) -> float:
        client = tc.InferenceServerClient(url)
        try:
            await client.infer(model, grpc_inputs(PROMPTS[0], fresh_image(), 4))  # warm
            images = [fresh_image() for _ in range(2 * count)]  # made before the clock

            async def one(i: int):
                from benchmarks.load import Sample

                start = time.perf_counter()
                await client.infer(model, grpc_inputs(PROMPTS[i % 8], images[i], max_tokens))
                return Sample(time.perf_counter() - start, tokens=max_tokens)

            run = await drive(f"{model} infer c={count}", count, 2 * count, one)
            return sum(sample.tokens for sample in run.ok) / run.wall
        finally:
            await client.close()

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"IGNORE_EOS": "true", "MAX_RUNNING": str(max(rows)), "MAX_WAITING": str(2 * max(rows))}
        server = start_server(models_dir, Path(tmp) / "triton.log", models, env)
        try:
            for model in models:
                e = engine(models_dir, model, WARMUP="false", COMPILE_STEP="false")
                before = torch.get_num_threads()
                torch.set_num_threads(cpu_threads(e.settings))
                try:
                    figures: dict[str, list[float]] = {}
                    for _ in range(rounds):
                        for n in rows:
                            infer = asyncio.run(served(server.grpc_url, model, n))
                            bare = bare_generate_tok_s(e, n, max_tokens)
                            figures.setdefault(f"infer_tok_s_{n}", []).append(infer)
                            figures.setdefault(f"generate_tok_s_{n}", []).append(bare)
                            figures.setdefault(f"infer_over_generate_{n}", []).append(infer / bare)
                finally:
                    torch.set_num_threads(before)
                    e.close()
                out[model] = {k: round(statistics.median(v), 3 if "over" in k else 1) for k, v in figures.items()}
                out[model]["rounds"] = rounds
        finally:
            server.stop()
    return out


def measure_kv(models_dir: Path, say=print) -> dict:
    out: dict = {}
    say("KV: KServe infer through Triton against the bare model's generate, 16 and 64 rows")
    out["kserve_over_generate"] = kserve_against_generate(models_dir, ["llava", "qwen3-vl"], [16, 64])
    say(f"KV: {out['kserve_over_generate']}")
    say("KV: a decode step alone and beside a busy neighbour core (what served work around the engine costs it)")
    out["neighbour"] = neighbour.step_cost(models_dir)
    say(f"KV: {out['neighbour']}")
    say("KV: bytes per join and leave, peak over live")
    out["join_leave"] = join_and_leave(models_dir)
    say(f"KV: {out['join_leave']}")
    for rows in (16, 64):
        say(f"KV: tokens/s at {rows} rows against generate")
        out[f"throughput_{rows}"] = throughput(models_dir, rows)
        say(f"KV: {out[f'throughput_{rows}']}")
    for rows in (16, 64):
        say(f"KV: tokens/s at {rows} rows against generate, KV-heavy checkpoint")
        out[f"kv_heavy_throughput_{rows}"] = kv_heavy_throughput(models_dir, rows)
        say(f"KV: {out[f'kv_heavy_throughput_{rows}']}")
    say("KV: a watcher stream while long prompts join and leave")
    out["watcher"] = watcher_pace(models_dir)
    say(f"KV: {out['watcher']}")
    return out


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".models" / "tiny"
    print(json.dumps(measure_kv(folder), indent=2))
