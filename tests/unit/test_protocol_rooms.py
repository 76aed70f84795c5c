"""The translation rooms of the Responses, Anthropic Messages and completions routes against a
scripted backend (no model): what each protocol's request becomes for the engine, the stored
state of the Responses API and its limits, and the error shapes. The real backends and the
official SDKs are in tests/fastapi_app/test_{responses,anthropic,completions}_api.py."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from fastapi_app.backends.base import Delta, Final, GenerationRequest
from fastapi_app.main import create_app
from fastapi_app.settings import Settings
from tests.conftest import image_bytes


@dataclass
class ScriptedBackend:
    """Answers every request with ``words``; keeps the requests it saw."""

    words: list[str] = field(default_factory=lambda: ["Hello", " there", "."])
    seen: list[GenerationRequest] = field(default_factory=list)
    name: str = "scripted"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> dict[str, bool]:
        return {"qwen3-vl": True, "llava": True}

    async def stream(self, request: GenerationRequest):
        self.seen.append(request)
        prompt = sum(len(m.text.split()) + 10 * len(m.images) for m in request.messages)
        if request.count_only:
            yield Final("", prompt, 0, "stop")
            return
        for index in range(request.n):
            for word in self.words:
                yield Delta(word, index=index)
            yield Final("".join(self.words), prompt, len(self.words), "stop", index=index)


@pytest.fixture
def client(tmp_path):
    def make(**settings):
        app = create_app(Settings(history_db=tmp_path / "h.sqlite3", served_models="llava,qwen3-vl", **settings))
        app.state.backend = ScriptedBackend()
        return TestClient(app), app.state.backend

    return make


PNG = image_bytes((8, 8), "PNG")
DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
ASK = {"role": "user", "content": "hi"}
REFUSAL = {"type": "refusal", "refusal": "I cannot say."}
BMP = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": base64.b64encode(PNG).decode()}}


def test_a_continued_response_sends_the_whole_conversation_with_its_image(client):
    http, backend = client()
    with http:
        first = http.post(
            "/v1/responses",
            json={
                "model": "qwen3-vl",
                "instructions": "Be brief.",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "What is it?"},
                            {"type": "input_image", "image_url": DATA_URL},
                        ],
                    }
                ],
            },
        ).json()
        second = http.post(
            "/v1/responses", json={"model": "qwen3-vl", "input": "And now?", "previous_response_id": first["id"]}
        ).json()
    roles = [(m.role, m.text, len(m.images)) for m in backend.seen[1].messages]
    # the first turn's instructions are not carried on (OpenAI's rule); its image is
    assert roles == [("user", "What is it?", 1), ("assistant", "Hello there.", 0), ("user", "And now?", 0)]
    assert backend.seen[0].messages[0].role == "system"
    assert second["previous_response_id"] == first["id"] and second["status"] == "completed"


def test_a_chain_longer_than_max_response_chain_needs_truncation_auto(client):
    http, backend = client(max_response_chain=2)
    with http:
        previous = None
        for turn in range(3):
            body = {"model": "qwen3-vl", "input": f"turn {turn}", "previous_response_id": previous}
            previous = http.post("/v1/responses", json={k: v for k, v in body.items() if v is not None}).json()["id"]
        longer = {"model": "qwen3-vl", "input": "turn 3", "previous_response_id": previous}
        refused = http.post("/v1/responses", json=longer)
        cut = http.post("/v1/responses", json={**longer, "truncation": "auto"})
    assert refused.status_code == 400 and "MAX_RESPONSE_CHAIN" in refused.json()["error"]["message"]
    assert cut.status_code == 200
    last = [m.text for m in backend.seen[-1].messages if m.role == "user"]
    assert last == ["turn 1", "turn 2", "turn 3"]  # two stored responses back, then this turn


def test_the_stored_responses_are_bounded_in_bytes(tmp_path):
    from fastapi_app.response_store import ResponseStore

    store = ResponseStore(tmp_path / "h.sqlite3", max_rows=100, max_bytes=2500)
    for i in range(6):
        store.add({"id": f"r{i}", "created_at": i, "output": []}, [{"text": "x" * 900}])
    kept = [i for i in range(6) if store.get(f"r{i}") is not None]
    assert kept == [4, 5]  # about 1 kB each: the newest that fit in 2.5 kB
    store.close()


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/v1/messages", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ("/v1/messages", {"tools": [{"name": "zoom"}]}, "input_schema"),
        ("/v1/messages", {"tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}}, "true or false"),
        (
            "/v1/messages/count_tokens",
            {"tool_choice": {"type": "none", "disable_parallel_tool_use": "yes"}},
            "disable_parallel_tool_use must be true or false",
        ),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, BMP]}]},
            "media_type must be one of image/png",
        ),
        (
            "/v1/messages",
            {"messages": [ASK, {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
            "with an id, a name and an input object",
        ),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": 1}]}]},
            "is_error must be true or false",
        ),
        ("/v1/responses", {"reasoning": {"effort": "high"}}, "reasoning"),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "output_text", "text": "hi"}]}]},
            "a user message takes input_text, input_image parts",
        ),
        (
            "/v1/responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "refusal": "hi"}]}]},
            "input_text needs text",
        ),
        (
            "/v1/responses",
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "function_call", "id": 5, "call_id": "c", "name": "f", "arguments": "{}"},
                ]
            },
            "input[1].id must be a string",
        ),
        (
            "/v1/responses",
            {"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image"}]}]},
            "images are not served",
        ),
    ],
)
def test_what_cannot_be_honoured_is_refused(client, path, body, says):
    http, _ = client()
    base = {"model": "qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/responses":
        base = {"model": "qwen3-vl", "input": "hi"}
    if path == "/v1/messages/count_tokens":
        base.pop("max_tokens")
    with http:
        reply = http.post(path, json={**base, **body})
    assert reply.status_code == 400 and says in reply.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"thinking": {"type": "disabled"}}),
        ("/v1/responses", {"reasoning": {}}),
        ("/v1/responses", {"background": False}),
        (
            "/v1/responses",  # an assistant's refusal, in the shape input_items lists it
            {"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [REFUSAL]}, ASK]},
        ),
        (
            "/v1/responses",
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "hi"},
                            {"type": "input_image", "image_url": DATA_URL, "detail": "original"},
                        ],
                    }
                ]
            },
        ),
    ],
)
def test_what_asks_for_nothing_is_accepted(client, path, body):
    http, _ = client()
    base = {"model": "qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    if path == "/v1/responses":
        base = {"model": "qwen3-vl", "input": "hi"}
    with http:
        assert http.post(path, json={**base, **body}).status_code == 200


def test_with_store_responses_off_nothing_is_kept_and_continuing_is_a_404(client):
    http, _ = client(store_responses=False)
    with http:
        made = http.post("/v1/responses", json={"model": "llava", "input": "hi"}).json()
        assert made["store"] is False
        assert http.get(f"/v1/responses/{made['id']}").status_code == 404
        refused = http.post("/v1/responses", json={"model": "llava", "input": "hi", "previous_response_id": made["id"]})
    assert refused.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "not_found" and "previous response" in error["message"]


def test_input_items_are_paged_in_either_order(client):
    http, _ = client()
    with http:
        items = [{"role": "user", "content": f"part {i}"} for i in range(5)]
        made = http.post("/v1/responses", json={"model": "llava", "input": items}).json()
        newest = http.get(f"/v1/responses/{made['id']}/input_items", params={"limit": 2}).json()
        oldest = http.get(f"/v1/responses/{made['id']}/input_items", params={"order": "asc", "limit": 2}).json()
        rest = http.get(
            f"/v1/responses/{made['id']}/input_items", params={"order": "asc", "after": oldest["last_id"]}
        ).json()
    text = lambda page: [item["content"][0]["text"] for item in page["data"]]  # noqa: E731
    assert text(newest) == ["part 4", "part 3"] and newest["has_more"] is True
    assert text(oldest) == ["part 0", "part 1"] and text(rest) == ["part 2", "part 3", "part 4"]
    assert rest["has_more"] is False


def test_a_refusal_is_listed_in_openais_shape_and_sent_back_as_is(client):
    http, backend = client()
    with http:
        body = {"model": "llava", "input": [ASK, {"role": "assistant", "content": [REFUSAL]}, ASK]}
        made = http.post("/v1/responses", json=body).json()
        listed = http.get(f"/v1/responses/{made['id']}/input_items", params={"order": "asc"}).json()["data"]
        assert listed[1]["content"] == [REFUSAL]
        again = [{k: item[k] for k in ("type", "role", "content")} for item in listed]
        assert http.post("/v1/responses", json={"model": "llava", "input": again}).status_code == 200
    assert [m.text for m in backend.seen[0].messages] == ["hi", "I cannot say.", "hi"]
    assert [m.text for m in backend.seen[1].messages] == ["hi", "I cannot say.", "hi"]


def test_anthropic_blocks_become_the_engines_turns(client):
    http, backend = client()
    image = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(PNG).decode()}
    with http:
        reply = http.post(
            "/v1/messages",
            json={
                "model": "qwen3-vl",
                "max_tokens": 5,
                "system": [{"type": "text", "text": "Be brief."}],
                "stop_sequences": ["END"],
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": image}, {"type": "text", "text": "Hi"}]},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "toolu_1", "name": "zoom", "input": {"x": 1}}],
                    },
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]},
                ],
                "tools": [{"name": "zoom", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            },
        )
    assert reply.status_code == 200, reply.text
    seen = backend.seen[0]
    assert [(m.role, len(m.images)) for m in seen.messages] == [
        ("system", 0),
        ("user", 1),
        ("assistant", 0),
        ("tool", 0),
    ]
    assert seen.messages[2].tool_calls[0]["function"] == {"name": "zoom", "arguments": {"x": 1}}
    assert seen.messages[3].tool_call_id == "toolu_1" and seen.messages[3].text == "ok"
    assert seen.tools["tool_choice"] == "required" and seen.tools["parallel_tool_calls"] is False
    assert seen.sampling == {"stop": ["END"]} and seen.max_tokens == 5
    assert reply.json()["content"] == [{"type": "text", "text": "Hello there."}]
    assert reply.json()["stop_reason"] == "end_turn"


def test_anthropic_streams_its_event_names(client):
    http, _ = client()
    with (
        http,
        http.stream(
            "POST",
            "/v1/messages",
            json={"model": "llava", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
        ) as reply,
    ):
        events = [line.removeprefix("event: ") for line in reply.iter_lines() if line.startswith("event: ")]
    assert events == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "shape"),
    [
        ("/v1/messages", {"model": "llava", "messages": []}, 400, "anthropic"),
        (
            "/v1/messages",
            {"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
            404,
            "anthropic",
        ),
        ("/v1/messages/count_tokens", {"model": "llava"}, 400, "anthropic"),
        ("/v1/responses", {"model": "llava"}, 400, "openai"),
        ("/v1/completions", {"model": "llava", "prompt": "x", "suffix": "y"}, 400, "openai"),
    ],
)
def test_errors_come_in_the_shape_of_the_paths_api(client, path, body, status, shape):
    http, _ = client()
    with http:
        reply = http.post(path, json=body)
    assert reply.status_code == status
    if shape == "anthropic":
        assert reply.json()["type"] == "error" and set(reply.json()["error"]) == {"type", "message"}
    else:
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_x_api_key_is_accepted_like_a_bearer_key(client):
    http, _ = client(api_keys="k1")
    body = {"model": "llava", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    with http:
        assert http.post("/v1/messages", json=body, headers={"x-api-key": "k1"}).status_code == 200
        assert http.post("/v1/messages", json=body, headers={"Authorization": "Bearer k1"}).status_code == 200
        refused = http.post("/v1/messages", json=body, headers={"x-api-key": "nope"})
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_completions_send_the_prompt_raw_and_echo_it(client):
    http, backend = client()
    with http:
        reply = http.post(
            "/v1/completions", json={"model": "llava", "prompt": ["Once upon", "A time"], "echo": True, "n": 2}
        ).json()
    assert [request.raw for request in backend.seen] == [True, True]
    assert [request.messages[0].text for request in backend.seen] == ["Once upon", "A time"]
    assert [c["text"] for c in reply["choices"]] == ["Once uponHello there."] * 2 + ["A timeHello there."] * 2
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert backend.seen[0].max_tokens == 16  # OpenAI's default for completions


def test_count_tokens_asks_the_engine_to_count_only(client):
    http, backend = client()
    with http:
        reply = http.post(
            "/v1/messages/count_tokens", json={"model": "llava", "messages": [{"role": "user", "content": "one two"}]}
        )
    assert reply.json() == {"input_tokens": 2} and backend.seen[0].count_only is True


def test_a_table_from_before_sizes_were_kept_gets_them(tmp_path):
    import sqlite3

    from fastapi_app.response_store import ResponseStore

    old = sqlite3.connect(tmp_path / "h.sqlite3")
    old.execute(
        "CREATE TABLE responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, previous_id TEXT, "
        "input_items TEXT NOT NULL, response TEXT NOT NULL, created_at REAL NOT NULL)"
    )
    old.execute("INSERT INTO responses (id, input_items, response, created_at) VALUES ('r0', '[]', '{}', 0)")
    old.commit()
    old.close()
    store = ResponseStore(tmp_path / "h.sqlite3", max_rows=10, max_bytes=10**6)
    store.add({"id": "r1", "created_at": 1, "output": []}, [])
    assert store.get("r0") is not None and store.get("r1") is not None
    store.close()
