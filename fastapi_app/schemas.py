"""JSON schemas of the OpenAPI document: the errors, the chat messages the engine accepts,
the success bodies. Plain dicts, assembled per app by ``fastapi_app.openapi``."""

from __future__ import annotations

from typing import Any

from vlm_engine.chat import TEXT_PATTERN

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


IMAGE_DATA_URL = {"type": "string", "format": "image-data-url", "description": "data:image/png;base64,<bytes>"}
TEXT = {"type": "string", "pattern": TEXT_PATTERN}
MESSAGE_SCHEMAS: dict[str, Any] = {
    "TextPart": {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    },
    "ImagePart": {
        "type": "object",
        "required": ["type", "image_url"],
        "properties": {
            "type": {"const": "image_url"},
            "image_url": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["url"],
                        "properties": {"url": IMAGE_DATA_URL, "detail": {"enum": ["auto", "low", "high"]}},
                    },
                    IMAGE_DATA_URL,
                ]
            },
        },
    },
    "UserMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"const": "user"},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"anyOf": [ref("TextPart"), ref("ImagePart")]},
                        "contains": ref("ImagePart"),
                        "minContains": 0,
                        "maxContains": 1,
                    },
                ]
            },
            "name": {"type": "string"},
        },
    },
    "OtherMessage": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"enum": ["system", "assistant"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": ref("TextPart")}]},
            "name": {"type": "string"},
        },
    },
}
# the conversation: a user message with text somewhere; at most one message with an image
USER_WITH_TEXT = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {
            "anyOf": [
                TEXT,
                {
                    "type": "array",
                    "contains": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": TEXT},
                    },
                },
            ]
        },
    },
}
WITH_IMAGE = {
    "type": "object",
    "required": ["content"],
    "properties": {"content": {"type": "array", "contains": ref("ImagePart")}},
}


USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens"],
    "properties": {
        name: {"type": "integer", "minimum": 0} for name in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}
ENTITIES = {
    "type": "array",
    "description": "grounded phrases (Kosmos-2; moondream2's /detect and /point): boxes or points in 0..1",
    "items": {"type": "object"},
}
FINISH = {"enum": ["stop", "length"]}
RESPONSE_SCHEMAS: dict[str, Any] = {
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"const": 0},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"const": "assistant"},
                                "content": {"type": "string"},
                                "entities": ENTITIES,
                            },
                        },
                        "finish_reason": FINISH,
                    },
                },
            },
            "usage": USAGE,
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "ready"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "ready": {"type": "boolean"},
                    },
                },
            },
        },
    },
    "ChatAnswer": {
        "type": "object",
        "required": ["session_id", "model", "response", "finish_reason", "usage"],
        "properties": {
            "session_id": {"type": "string"},
            "model": {"type": "string"},
            "response": {"type": "string"},
            "seconds": {"type": "number", "minimum": 0},
            "finish_reason": FINISH,
            "usage": USAGE,
            "entities": ENTITIES,
        },
    },
    "Session": {
        "type": "object",
        "required": ["session_id", "turns"],
        "properties": {
            "session_id": {"type": "string"},
            "turns": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["model", "prompt", "response", "had_image", "created_at"],
                    "properties": {
                        "model": {"type": "string"},
                        "prompt": {"type": "string"},
                        "response": {"type": "string"},
                        "had_image": {"type": "boolean"},
                        "created_at": {"type": "number"},
                    },
                },
            },
        },
    },
}
# operation -> its 200 body
SUCCESS = {
    ("/v1/chat/completions", "post"): "ChatCompletion",
    ("/v1/models", "get"): "ModelList",
    ("/api/chat", "post"): "ChatAnswer",
    ("/api/sessions/{session_id}", "get"): "Session",
}
