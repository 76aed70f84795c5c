"""/api/chat with server-side history, on both backends."""

from __future__ import annotations

import base64
import json
import uuid

import httpx

from tests.fastapi_app.conftest import ApiProcess


def chat(api, **body) -> dict:
    reply = httpx.post(api.url + "/api/chat", json={"max_tokens": 8, "temperature": 0.0, **body}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def completion(api, messages) -> str:
    body = {"model": "llava", "messages": messages, "max_tokens": 8, "temperature": 0.0}
    reply = httpx.post(api.url + "/v1/chat/completions", json=body, timeout=60)
    return reply.json()["choices"][0]["message"]["content"]


def test_second_turn_sees_the_first_exchange(any_api, png):
    session = uuid.uuid4().hex
    image = base64.b64encode(png).decode()
    first = chat(any_api, session_id=session, model="llava", prompt="Describe this picture.", image=image)
    assert first["seconds"] > 0 and first["response"]
    second = chat(any_api, session_id=session, model="llava", prompt="And the colors?")
    with_history = completion(
        any_api,
        [
            {"role": "user", "content": "Describe this picture."},
            {"role": "assistant", "content": first["response"]},
            {"role": "user", "content": "And the colors?"},
        ],
    )
    alone = completion(any_api, [{"role": "user", "content": "And the colors?"}])
    assert second["response"] == with_history
    assert with_history != alone, "the history should change the answer"


def test_history_is_trimmed_and_survives_a_restart(tmp_path, triton):
    db = tmp_path / "history.sqlite3"
    env = {"HISTORY_DB": str(db), "MAX_HISTORY": "2", "TRITON_GRPC_URL": triton.grpc_url}
    session = uuid.uuid4().hex
    api = ApiProcess("api-restart", env).start()
    try:
        for i in range(3):
            chat(api, session_id=session, model="qwen3-vl", prompt=f"question {i}")
        kept = httpx.get(f"{api.url}/api/sessions/{session}").json()["turns"]
        assert [t["prompt"] for t in kept] == ["question 1", "question 2"]
    finally:
        api.stop()
    api = ApiProcess("api-restart", env).start()
    try:
        after = httpx.get(f"{api.url}/api/sessions/{session}").json()["turns"]
        assert after == kept
        assert httpx.delete(f"{api.url}/api/sessions/{session}").status_code == 204
        missing = httpx.get(f"{api.url}/api/sessions/{session}")
        assert missing.status_code == 404 and "no session" in missing.json()["detail"]
        again = httpx.post(f"{api.url}/api/chat", json={"session_id": session, "prompt": "back?"}, timeout=60)
        assert again.status_code == 409 and "was deleted" in again.json()["detail"], again.text
        assert httpx.get(f"{api.url}/api/sessions/{session}").status_code == 404, "a deleted session stays deleted"
    finally:
        api.stop()


def test_multipart_upload_streams_chunks_then_done(api, jpeg):
    files = {"image": ("photo.jpg", jpeg, "image/jpeg")}
    data = {
        "session_id": uuid.uuid4().hex,
        "model": "kosmos2",
        "prompt": "An image of",
        "stream": "true",
        "max_tokens": "8",
        "temperature": "0",
    }
    events = []
    with httpx.stream("POST", api.url + "/api/chat", data=data, files=files, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    # one chunk or more: how many depends on how tokens fall into STREAM_GAP_MS, i.e. the machine's speed
    assert [e["type"] for e in events[:-1]] == ["chunk"] * (len(events) - 1) and len(events) >= 2
    done = events[-1]
    assert done["type"] == "done" and done["response"] == "".join(e["content"] for e in events[:-1])
    assert done["seconds"] > 0 and isinstance(done["entities"], list)


def test_rest_chat_bad_input(api):
    cases = [
        ({"model": "llava"}, 400, "prompt: Field required"),
        ({"prompt": "hi", "model": "nope"}, 404, "unknown model"),
        ({"prompt": "hi", "model": ""}, 404, "unknown model ''"),
        ({"prompt": "hi", "model": "llava", "image": "%%%"}, 400, "base64"),
        (
            {"prompt": "hi", "model": "llava", "image": base64.b64encode(b"not an image").decode()},
            400,
            "not a recognised image",
        ),
        ({"prompt": "", "model": "llava"}, 400, "prompt is empty"),
        ({"prompt": "hi", "model": "llava", "image": "data:image/png;base64,"}, 400, "image is empty"),
        ({"prompt": "hi", "model": "llava", "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal"),
        # a session id is a path segment later (/api/sessions/{id}): no slash, no control character
        ({"prompt": "hi", "model": "llava", "session_id": "a/b"}, 400, "session_id: String should match pattern"),
        ({"prompt": "hi", "model": "llava", "session_id": "a\x00b"}, 400, "session_id: String should match pattern"),
    ]
    for body, status, says in cases:
        reply = httpx.post(api.url + "/api/chat", json=body, timeout=30)
        assert reply.status_code == status, (body, reply.text)
        assert says in reply.json()["detail"], (body, reply.json())
    for path in ("/api/sessions/a%01b", "/api/sessions/" + "x" * 129):
        reply = httpx.get(api.url + path, timeout=10)
        assert reply.status_code == 400 and "session_id" in reply.json()["detail"], (path, reply.text)
    reply = httpx.post(api.url + "/api/chat", content=b"{oops", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["detail"]
    # "" is no image, as an empty multipart field is (the OpenAPI document allows it)
    body = {"prompt": "hi", "model": "llava", "image": "", "max_tokens": 4, "temperature": 0}
    without = {k: v for k, v in body.items() if k != "image"}
    replies = [httpx.post(api.url + "/api/chat", json=b, timeout=60) for b in (body, without)]
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert replies[0].json()["response"] == replies[1].json()["response"]


def test_moondream2_point_through_the_rest_chat_carries_entities(api, png):
    body = {
        "session_id": uuid.uuid4().hex,
        "model": "moondream2",
        "prompt": "/point tree",
        "image": base64.b64encode(png).decode(),
    }
    reply = httpx.post(api.url + "/api/chat", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    (entity,) = reply.json()["entities"]
    assert entity["phrase"] == "tree" and entity["points"] and all(0 <= v <= 1 for p in entity["points"] for v in p)
