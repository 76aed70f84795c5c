"""A small asyncio load driver: N requests at a fixed concurrency, latencies and TTFT."""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Sample:
    seconds: float
    ttft: float | None = None
    chunks: int = 0
    text: str = ""
    ok: bool = True
    error: str = ""
    tokens: int = 0  # output tokens, where the server reports them


@dataclass
class Run:
    label: str
    concurrency: int
    wall: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    def summary(self) -> dict:
        lat = sorted(s.seconds for s in self.ok)
        ttft = sorted(s.ttft for s in self.ok if s.ttft is not None)
        gaps = [(s.seconds - s.ttft) / (s.chunks - 1) for s in self.ok if s.ttft is not None and s.chunks > 1]
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "failed": len(self.samples) - len(self.ok),
            "rps": round(len(self.ok) / self.wall, 3),
            "p50_ms": round(pct(lat, 50) * 1000, 2),
            "p95_ms": round(pct(lat, 95) * 1000, 2),
            "ttft_p50_ms": round(pct(ttft, 50) * 1000, 2) if ttft else None,
            "inter_chunk_ms": round(statistics.mean(gaps) * 1000, 3) if gaps else None,
            "first_error": next((s.error for s in self.samples if not s.ok), None),
        }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[index]


async def drive(label: str, concurrency: int, total: int, one: Callable[[int], Awaitable[Sample]]) -> Run:
    """Run ``total`` calls of ``one(i)`` with ``concurrency`` in flight."""
    queue = list(range(total))
    samples: list[Sample | None] = [None] * total

    async def worker() -> None:
        while queue:
            i = queue.pop(0)
            try:
                samples[i] = await one(i)
            except Exception as exc:
                samples[i] = Sample(0.0, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(label, concurrency, time.perf_counter() - start, [s for s in samples if s is not None])


def kserve_inputs(prompt: str, image: bytes, max_tokens: int) -> list:
    """Greedy KServe v2 inputs as tritonclient sends them (binary tensor data)."""
    import numpy as np
    import tritonclient.http.aio as tc

    tensors = []
    for name, array, dtype in (
        ("prompt", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
        ("image", np.frombuffer(image, dtype=np.uint8).reshape(1, -1), "UINT8"),
        ("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
        ("temperature", np.array([[0.0]], dtype=np.float32), "FP32"),
    ):
        tensor = tc.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


async def kserve_infer(client, model: str, inputs: list) -> Sample:
    """One ``infer`` with a ``tritonclient.http.aio`` client."""
    start = time.perf_counter()
    result = await client.infer(model, inputs)
    return Sample(time.perf_counter() - start, text=result.as_numpy("generated_text").reshape(-1)[0].decode())


def chat_body(model: str, prompt: str, image: bytes, max_tokens: int, stream: bool) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }


async def openai_chat(client: httpx.AsyncClient, base: str, body: dict) -> Sample:
    start = time.perf_counter()
    if not body["stream"]:
        reply = await client.post(f"{base}/v1/chat/completions", json=body)
        seconds = time.perf_counter() - start
        ok = reply.status_code == 200
        return Sample(seconds, text=reply.json()["choices"][0]["message"]["content"] if ok else "", ok=ok)
    return await _sse(client, f"{base}/v1/chat/completions", body, start, _openai_delta)


async def generate_stream(client: httpx.AsyncClient, base: str, model: str, body: dict) -> Sample:
    return await _sse(
        client,
        f"{base}/v2/models/{model}/generate_stream",
        body,
        time.perf_counter(),
        lambda event: event.get("generated_text", ""),
    )


def _openai_delta(event) -> str:
    if event == "[DONE]" or not event.get("choices"):
        return ""
    return event["choices"][0]["delta"].get("content") or ""


async def _sse(client, url: str, body: dict, start: float, text_of) -> Sample:
    ttft, chunks, text = None, 0, []
    async with client.stream("POST", url, json=body) as reply:
        if reply.status_code != 200:
            return Sample(time.perf_counter() - start, ok=False)
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            raw = line[6:]
            piece = text_of(raw if raw == "[DONE]" else json.loads(raw))
            if piece:
                chunks += 1
                text.append(piece)
                if ttft is None:
                    ttft = time.perf_counter() - start
    return Sample(time.perf_counter() - start, ttft, chunks, "".join(text))
