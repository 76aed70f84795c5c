"""JSON schemas of the OpenAPI document: the errors, the chat messages the engine accepts,
the success bodies. Plain dicts, assembled per app by ``fastapi_app.openapi``."""

from __future__ import annotations

from typing import Any

from vlm_engine.chat import DETAILS, TEXT_PATTERN
from vlm_engine.tools import NAME_PATTERN as TOOL_NAME

# OpenAPI before 3.2: a text/event-stream schema describes one event
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk; '[DONE]' ends an OpenAI stream"}},
    "description": "with stream: true, server-sent events",
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": "string"},
                },
            }
        },
    },
    "APIError": {
        "type": "object",
        "required": ["detail", "code"],
        "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    },
}


def obj(required: list[str], **properties: Any) -> dict[str, Any]:
    """An object schema: these properties, these of them required."""
    return {"type": "object", "required": required, "properties": properties}


IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")  # Anthropic's image blocks, as its API
IMAGE_DATA_URL = {"type": "string", "format": "image-data-url", "description": "data:image/png;base64,<bytes>"}
TEXT = {"type": "string", "pattern": TEXT_PATTERN}
IMAGE_REF = obj(["url"], url=IMAGE_DATA_URL, detail={"enum": list(DETAILS)})
USER_CONTENT = {
    "type": "array",
    "items": {"anyOf": [ref("TextPart"), ref("ImagePart")]},
    "contains": ref("ImagePart"),
    "minContains": 0,
    "maxContains": 1,
}
MESSAGE_SCHEMAS: dict[str, Any] = {
    "TextPart": obj(["type", "text"], type={"const": "text"}, text={"type": "string"}),
    "ImagePart": obj(
        ["type", "image_url"], type={"const": "image_url"}, image_url={"anyOf": [IMAGE_REF, IMAGE_DATA_URL]}
    ),
    "UserMessage": obj(
        ["role", "content"],
        role={"const": "user"},
        content={"anyOf": [{"type": "string"}, USER_CONTENT]},
        name={"type": "string"},
    ),
    "OtherMessage": obj(
        ["role", "content"],
        role={"enum": ["system", "assistant", "tool"]},
        content={"anyOf": [{"type": "string"}, {"type": "array", "items": ref("TextPart")}, {"type": "null"}]},
        name={"type": "string"},
        tool_calls={"anyOf": [{"type": "array", "items": ref("ToolCall")}, {"type": "null"}]},
        tool_call_id={"type": "string"},
    ),
    "ToolCall": obj(
        ["function"],
        id={"type": "string"},
        type={"const": "function"},
        function=obj(["name"], name={"type": "string"}, arguments={"type": "string", "description": "JSON text"}),
    ),
    "Tool": obj(
        ["type", "function"],
        type={"const": "function"},
        function=obj(
            ["name"],
            name={"type": "string", "pattern": TOOL_NAME},
            description={"anyOf": [{"type": "string"}, {"type": "null"}]},
            parameters={"type": "object", "description": "a JSON schema of the arguments"},
            strict={"anyOf": [{"type": "boolean"}, {"type": "null"}]},
        ),
    ),
}
# tool_choice naming one function
NAMED_TOOL = obj(["type", "function"], type={"const": "function"}, function=obj(["name"], name={"type": "string"}))
# a message of a conversation with tools: a tool result, or an assistant turn with calls
TOOL_TURN = {
    "anyOf": [
        obj(["role"], role={"const": "tool"}),
        obj(["tool_calls"], tool_calls={"type": "array", "minItems": 1}),
    ]
}
# the conversation: a user message with text somewhere; messages with images counted (openapi.py)
TEXT_PART_WITH_TEXT = obj(["type", "text"], type={"const": "text"}, text=TEXT)
USER_WITH_TEXT = obj(
    ["role", "content"],
    role={"const": "user"},
    content={"anyOf": [TEXT, {"type": "array", "contains": TEXT_PART_WITH_TEXT}]},
)
WITH_IMAGE = obj(["content"], content={"type": "array", "contains": ref("ImagePart")})

# logit_bias. The document's promise is that a request it allows is never a 400, but whether a
# token id is in the vocabulary depends on the checkpoint a model was loaded from, which the
# service cannot know (Triton loads it; the tests serve tiny ones). So the document allows the
# ids every checkpoint served here has: 0 to 255. The real ones have 32,064 (LLaVA-1.5), 65,037
# (Kosmos-2) and 151,936 (Qwen3-VL) (moondream2 takes no logit_bias); the tiny ones
# (vlm_engine/tiny) have 791 and 797 (byte-level BPE, whose vocabulary starts from the 256 bytes,
# whatever the corpus) and 1,393 (Kosmos-2's unigram). Larger ids are taken up to the model's
# own vocabulary (the engine checks each id: VLMEngine.prepare); the document just does not
# promise them. Keys are written as the service reads them: decimal, no sign, no leading zero.
TOKEN_ID_BELOW_256 = r"^(?:[0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])$"
LOGIT_BIAS = {
    "anyOf": [
        {
            "type": "object",
            "propertyNames": {"pattern": TOKEN_ID_BELOW_256},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": 1024,
        },
        {"type": "null"},
    ],
}


STRING, NUMBER = {"type": "string"}, {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
USAGE = obj(["prompt_tokens", "completion_tokens"], prompt_tokens=COUNT, completion_tokens=COUNT, total_tokens=COUNT)
ENTITIES = {
    "type": "array",
    "description": "grounded phrases (Kosmos-2; moondream2's /detect and /point): boxes or points in 0..1",
    "items": {"type": "object"},
}
FINISH = {"enum": ["stop", "length"]}
CALL = obj(
    ["id", "type", "function"],
    id=STRING,
    type={"const": "function"},
    function=obj(["name", "arguments"], name=STRING, arguments={"type": "string", "description": "JSON text"}),
)
MESSAGE = obj(
    ["role", "content"],
    role={"const": "assistant"},
    content={"anyOf": [STRING, {"type": "null"}], "description": "null when the answer is only tool calls"},
    tool_calls={"type": "array", "minItems": 1, "items": CALL},
    entities=ENTITIES,
)
CHOICE = obj(
    ["index", "message", "finish_reason"],
    index=COUNT,
    message=MESSAGE,
    finish_reason={"enum": ["stop", "length", "tool_calls"]},
)
MODEL = obj(["id", "object", "ready"], id=STRING, object={"const": "model"}, ready={"type": "boolean"})
TURN = obj(
    ["model", "prompt", "response", "had_image", "created_at"],
    model=STRING,
    prompt=STRING,
    response=STRING,
    had_image={"type": "boolean"},
    created_at=NUMBER,
    seconds={"anyOf": [NUMBER, {"type": "null"}], "description": "how long the answer took; null in older turns"},
    completion_tokens={"anyOf": [COUNT, {"type": "null"}], "description": "the answer's tokens; null in older turns"},
)
RESPONSE_SCHEMAS: dict[str, Any] = {
    "ChatCompletion": obj(
        ["id", "object", "created", "model", "choices", "usage"],
        id=STRING,
        object={"const": "chat.completion"},
        created={"type": "integer"},
        model=STRING,
        choices={"type": "array", "minItems": 1, "items": CHOICE, "description": "n of them, index 0..n-1"},
        usage=USAGE,
    ),
    "ModelList": obj(["object", "data"], object={"const": "list"}, data={"type": "array", "items": MODEL}),
    "ChatAnswer": obj(
        ["session_id", "model", "response", "finish_reason", "usage"],
        session_id=STRING,
        model=STRING,
        response=STRING,
        seconds={"type": "number", "minimum": 0},
        finish_reason=FINISH,
        usage=USAGE,
        entities=ENTITIES,
    ),
    "Session": obj(["session_id", "turns"], session_id=STRING, turns={"type": "array", "minItems": 1, "items": TURN}),
}
# operation -> its 200 body
SUCCESS = {
    ("/v1/chat/completions", "post"): "ChatCompletion",
    ("/v1/models", "get"): "ModelList",
    ("/api/chat", "post"): "ChatAnswer",
    ("/api/sessions/{session_id}", "get"): "Session",
}
