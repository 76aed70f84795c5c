"""/v1 with the official openai SDK, on both backends."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from tests.conftest import image_bytes
from tests.fastapi_app.conftest import MAX_BODY_BYTES

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]


def sdk(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def vision_messages(image: bytes, text: str = "What is in this image?", mime: str = "image/png") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url(image, mime)}},
            ],
        }
    ]


def test_models_list_shows_the_four_and_their_readiness(any_api):
    models = sdk(any_api).models.list()
    assert sorted(m.id for m in models.data) == sorted(MODELS)
    assert all(m.model_extra["ready"] for m in models.data)


@pytest.mark.parametrize("model", MODELS)
def test_vision_chat_streamed_and_not(any_api, model, png):
    client = sdk(any_api)
    whole = client.chat.completions.create(model=model, messages=vision_messages(png), max_tokens=10, temperature=0.0)
    text = whole.choices[0].message.content
    assert text.strip()
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = client.chat.completions.create(
        model=model, messages=vision_messages(png), max_tokens=10, temperature=0.0, stream=True
    )
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # into how many deltas the text is cut depends on timing (chunks that piled up are joined);
    # test_cancellation proves that text streams while the answer is still being written
    assert deltas and "".join(deltas) == text


def test_sdk_sees_errors_as_its_own_exceptions(api, png):
    client = sdk(api)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.chat.completions.create(model="gpt-4o", messages=vision_messages(png))
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
        client.chat.completions.create(model="llava", messages=vision_messages(png), max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="not a recognised image"):
        client.chat.completions.create(model="llava", messages=vision_messages(b"garbage"), stream=True)


def _post(api, body=None, content=None) -> httpx.Response:
    return httpx.post(
        api.url + "/v1/chat/completions",
        json=body,
        content=content,
        timeout=60,
        headers={"content-type": "application/json"},
    )


def bad_requests(png: bytes) -> list[tuple[str, dict | bytes, int, str]]:
    good = {"model": "llava", "messages": vision_messages(png)}
    return [
        ("malformed JSON", b'{"model": "llava", "messages": [', 400, "not valid JSON"),
        ("wrong type", {**good, "max_tokens": "ten"}, 400, "max_tokens"),
        ("messages not a list", {**good, "messages": "hello"}, 400, "messages"),
        ("unknown model", {**good, "model": "gpt-4o"}, 404, "unknown model 'gpt-4o'"),
        (
            "undecodable image",
            {**good, "messages": vision_messages(b"\x89PNG\r\n\x1a\nnope")},
            400,
            "not a recognised image",
        ),
        (
            "image over the pixel limit",
            {**good, "messages": vision_messages(image_bytes((1100, 1000)))},
            400,
            "MAX_IMAGE_PIXELS",
        ),
        (
            "body over the size limit",
            {**good, "messages": vision_messages(b"x" * MAX_BODY_BYTES)},
            413,
            "MAX_BODY_BYTES",
        ),
        ("empty message list", {**good, "messages": []}, 400, "messages: List should have at least 1 item"),
        ("max_tokens 0", {**good, "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
        ("max_tokens above the cap", {**good, "max_tokens": 10_000}, 400, "max_tokens must be between 1 and 64"),
        ("temperature out of range", {**good, "temperature": 3.5}, 400, "temperature: Input should be less"),
        (
            "remote image while remote fetch is off",
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hi"},
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                        ],
                    }
                ],
            },
            400,
            "remote image URLs are disabled",
        ),
    ]


def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(any_api, png):
    for case, body, status, says in bad_requests(png):
        if case == "remote image while remote fetch is off" and any_api.name == "api-local":
            continue  # the local fixture has remote fetch on; see the next test
        reply = _post(any_api, content=body) if isinstance(body, bytes) else _post(any_api, body)
        assert reply.status_code == status, f"{case}: {reply.status_code} {reply.text[:300]}"
        error = reply.json()["error"]
        assert says in error["message"], f"{case}: {error}"
        assert error["type"] == "invalid_request_error"
    assert httpx.get(any_api.url + "/health/ready", timeout=10).status_code == 200
    ok = _post(any_api, {"model": "llava", "messages": vision_messages(png), "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]"])
def test_remote_image_to_private_targets_is_refused_when_remote_fetch_is_on(local_api, host):
    body = {
        "model": "llava",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": f"http://{host}:9/cat.png"}},
                ],
            }
        ],
    }
    reply = _post(local_api, body)
    assert reply.status_code == 400
    assert "private, loopback or reserved address" in reply.json()["error"]["message"]


def test_moondream2_detect_and_point_return_entities(any_api, png):
    client = sdk(any_api)
    whole = client.chat.completions.create(model="moondream2", messages=vision_messages(png, "/detect red car"))
    (entity,) = whole.choices[0].message.model_extra["entities"]
    assert entity["phrase"] == "red car" and entity["boxes"] and all(len(b) == 4 for b in entity["boxes"])
    assert (
        whole.choices[0].message.content
        == f"red car: {len(entity['boxes'])} {'box' if len(entity['boxes']) == 1 else 'boxes'}"
    )
    chunks = list(
        client.chat.completions.create(model="moondream2", messages=vision_messages(png, "/point tree"), stream=True)
    )
    (entity,) = chunks[-1].model_extra["entities"]
    assert entity["phrase"] == "tree" and all(len(p) == 2 for p in entity["points"])


def test_moondream2_bad_commands_are_400s_and_the_context_413(any_api, png):
    client = sdk(any_api)
    text_only = [{"role": "user", "content": "/caption"}]
    with pytest.raises(openai.BadRequestError, match="/caption needs an image"):
        client.chat.completions.create(model="moondream2", messages=text_only)
    # well formed, but more than moondream2's context holds: 413, never 400
    with pytest.raises(openai.APIStatusError, match="context is 512 positions") as caught:
        client.chat.completions.create(model="moondream2", messages=vision_messages(png, "why " * 140), max_tokens=64)
    assert caught.value.status_code == 413
