"""The local backend runs the same in-flight scheduler as Triton: concurrent chats get their
solo answers. (Rows sharing steps, certain only beside a row that cannot end first, is
checked on the engine: tests/unit/test_scheduler.py.)"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import image_bytes
from tests.fastapi_app.test_openai_api import vision_messages
from tests.integration.helpers import current_metrics, metric_samples
from vlm_engine.tiny.samples import PROMPTS


def scheduler_metric(url: str, name: str, **labels: str) -> float:
    text = current_metrics(url + "/metrics", labels.get("model"))
    return sum(metric_samples(text, name, **labels).values())


def test_concurrent_chats_match_single_answers(local_api):
    bodies = [
        {
            "model": "llava",
            "messages": vision_messages(image_bytes((60 + 30 * i, 80), "PNG"), PROMPTS[i]),
            "max_tokens": 16,
            "temperature": 0,
        }
        for i in range(6)
    ]

    def chat(body: dict) -> str:
        reply = httpx.post(local_api.url + "/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]

    alone = [chat(body) for body in bodies]
    steps = scheduler_metric(local_api.url, "vlm_scheduler_step_seconds_count", model="llava", kind="decode")
    tokens = scheduler_metric(local_api.url, "vlm_scheduler_generated_tokens_total", model="llava")
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(chat, bodies))
    assert together == alone
    steps = scheduler_metric(local_api.url, "vlm_scheduler_step_seconds_count", model="llava", kind="decode") - steps
    tokens = scheduler_metric(local_api.url, "vlm_scheduler_generated_tokens_total", model="llava") - tokens
    assert 0 < steps < tokens, f"{steps} decode steps for {tokens} tokens"
    assert scheduler_metric(local_api.url, "vlm_scheduler_queue_wait_seconds_count", model="llava") >= 12
    assert scheduler_metric(local_api.url, "vlm_scheduler_running_rows", model="llava") == 0
