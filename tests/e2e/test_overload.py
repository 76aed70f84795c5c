"""A burst of 300 chats at once through nginx: what does not fit in the queue is refused
with 503, the OpenAI error body and Retry-After; everything else is answered, and the stack
stays ready. (The refusals' latency is a benchmark figure: it is written to
artifacts/overload.json, not asserted here.)"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time

import httpx

from tests.conftest import ARTIFACTS


def test_a_burst_of_300_is_refused_fast_and_cleanly(stack, png):
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {
        "model": "llava",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }

    async def one(client: httpx.AsyncClient) -> tuple[int, float, dict, httpx.Headers]:
        started = time.perf_counter()
        reply = await client.post("/v1/chat/completions", json=body)
        return reply.status_code, time.perf_counter() - started, reply.json(), reply.headers

    async def burst():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=stack.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(300)))

    results = asyncio.run(burst())
    refused = [(s, t, b, h) for s, t, b, h in results if s == 503]
    answered = [r for r in results if r[0] == 200]
    assert len(refused) + len(answered) == 300, {s for s, *_ in results}
    assert refused, "nothing was refused: the burst did not reach the queue's limit"
    for _, _, body, headers in refused:
        assert headers["retry-after"] == "1" and body["error"]["code"] == "overloaded", body
        assert "retry later" in body["error"]["message"]
    assert all(b["choices"][0]["message"]["content"] for _, _, b, _ in answered)
    assert httpx.get(stack.url + "/health/ready", timeout=10).status_code == 200
    seconds = sorted(t for _, t, _, _ in refused)
    figures = {
        "requests": 300,
        "refused": len(refused),
        "answered": len(answered),
        "refusal_p50_ms": round(statistics.median(seconds) * 1000, 1),
        "refusal_p95_ms": round(seconds[int(0.95 * (len(seconds) - 1))] * 1000, 1),
    }
    (ARTIFACTS / "overload.json").write_text(json.dumps(figures, indent=1))
