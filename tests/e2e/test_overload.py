"""A burst of 300 requests for one model at once through nginx: what does not fit is refused
at the door (503, the route's error body, Retry-After), everything else is answered, and the
stack stays ready. The refusals' latency is a benchmark figure (``make bench``): it is
written to artifacts/overload.json, not asserted here."""

from __future__ import annotations

import base64
import json

import httpx

from loadtests import payloads
from loadtests.burst import burst, refusal_figures
from tests.conftest import ARTIFACTS


def _check(stack, replies, refused_body) -> dict:
    refused = [r for r in replies if r.status == 503]
    answered = [r for r in replies if r.status == 200]
    assert len(refused) + len(answered) == 300, {r.status for r in replies}
    assert refused, "nothing was refused: the burst did not reach the limit"
    for reply in refused:
        assert reply.headers["retry-after"] == "1", reply.headers
        refused_body(reply.json())
    assert httpx.get(stack.url + "/health/ready", timeout=10).status_code == 200
    return {**refusal_figures(replies), "answered_bodies": [r.json() for r in answered]}


def test_a_burst_of_300_chats_is_refused_at_the_door(stack, png):
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    content = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": image}}]
    body = {"model": "llava", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": content}]}

    def openai_error(body):
        assert body["error"]["code"] == "overloaded" and "retry later" in body["error"]["message"], body

    figures = _check(stack, burst(stack.url, "/v1/chat/completions", body), openai_error)
    assert all(b["choices"][0]["message"]["content"] for b in figures.pop("answered_bodies"))
    assert figures["answered"] >= 80, "NGINX_MAX_CHATS (80) chats are let through and answered"
    _record("openai", figures)


def test_a_burst_of_300_kserve_requests_is_refused_per_model(stack, png):
    body = payloads.kserve_json_body("What is it?", payloads.Picture("p.png", "PNG", png), 8)

    def triton_error(body):
        assert "retry later" in body["error"], body

    figures = _check(stack, burst(stack.url, "/v2/models/llava/infer", body), triton_error)
    assert all(b["outputs"] for b in figures.pop("answered_bodies"))
    _record("kserve", figures)


def _record(route: str, figures: dict) -> None:
    path = ARTIFACTS / "overload.json"
    recorded = json.loads(path.read_text()) if path.exists() and route != "openai" else {}
    path.write_text(json.dumps({**recorded, route: figures}, indent=1))
