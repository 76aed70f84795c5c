"""The OpenAPI document: the real request constraints, and every error a route can answer.

Requests: the model enum (the served models), the API's ``max_tokens`` maximum
(``MAX_TOKENS_CAP``), and the message shapes the engine accepts: at least one user message
with text, images only in user messages and at most one per request, images as data URLs
(custom formats ``image-data-url`` and ``image-base64``; ``image-file`` for multipart).
A request that passes the document is not refused as malformed (400); it can still be too
large for one model (413: a prompt past moondream2's context).


Responses: FastAPI lists only the success response (and a 422 this service never sends: validation
errors are 400). This adds, per operation, the errors it can return: 400 (malformed), 401
(API keys on), 404 (unknown model or session), 413 (body too large), 429 (per-client limit at
the gateway), 503 (overloaded, Triton unavailable, shutting down), each with the OpenAI
error body under ``/v1`` and ``{"detail", "code"}`` elsewhere."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from fastapi_app import openapi_protocols
from fastapi_app.error_shapes import api_of
from fastapi_app.schemas import (
    LOGIT_BIAS,
    MESSAGE_SCHEMAS,
    NAMED_TOOL,
    RESPONSE_SCHEMAS,
    SCHEMAS,
    SSE_EVENT,
    SUCCESS,
    TOOL_TURN,
    USER_WITH_TEXT,
    WITH_IMAGE,
    ref,
)
from fastapi_app.settings import Settings
from vlm_engine.settings import MODELS, MULTI_IMAGE, TOOL_FORMAT

NULL = {"type": "null"}

ERRORS = {
    "400": "malformed request: bad JSON, wrong types, out-of-range parameters, a bad image",
    "401": "missing or wrong API key (when API_KEYS is set)",
    "404": "unknown model or session",
    "409": "the session was deleted: start another (a new session_id)",
    "413": "request body over the size limit, or more than the model takes (prompt past its context)",
    "429": "too many requests from this client (gateway limit); see Retry-After",
    "503": "overloaded, Triton unavailable or shutting down; see Retry-After",
}


GENERAL = [status for status in ERRORS if status != "409"]


def _messages_schema(max_images: int) -> dict[str, Any]:
    return {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [ref("UserMessage"), ref("OtherMessage")]},
        "allOf": [{"contains": USER_WITH_TEXT}, {"contains": WITH_IMAGE, "minContains": 0, "maxContains": max_images}],
        "description": (
            f"OpenAI chat messages: a user message with text; images in user messages only, up to {max_images} "
            "per request counting every turn for llava and qwen3-vl (more: 413), one for kosmos2 and moondream2"
        ),
    }


def _no_tools(models: list[str]) -> dict[str, Any]:
    """Models without a tool format: no tools, no tool calls or results in the conversation."""
    return {
        "if": {"properties": {"model": {"enum": models}}, "required": ["model"]},
        "then": {
            "properties": {
                "tools": NULL,
                "tool_choice": {"anyOf": [NULL, {"const": "none"}]},
                "messages": {"items": {"not": TOOL_TURN}},
            }
        },
    }


def _one_image(models: list[str]) -> dict[str, Any]:
    """kosmos2 and moondream2 take one image: in one message, one part."""
    parts = {"type": "array", "contains": ref("ImagePart"), "minContains": 0, "maxContains": 1}
    content = {"anyOf": [{"type": "string"}, parts]}
    messages = {"contains": WITH_IMAGE, "minContains": 0, "maxContains": 1}
    messages["items"] = {"properties": {"content": content}}
    return {
        "if": {"properties": {"model": {"enum": models}}, "required": ["model"]},
        "then": {"properties": {"messages": messages}},
    }


def _error(path: str, status: str) -> dict[str, Any]:
    name = {"anthropic": "AnthropicError", "openai": "OpenAIError", "rest": "APIError"}[api_of(path)]
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    response: dict[str, Any] = {"description": ERRORS[status], "content": content}
    if status in ("429", "503"):
        response["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    if status == "401":
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def _with_maximum(schema: dict[str, Any], maximum: int) -> None:
    """``int | None`` with ``ge=1`` -> its integer branch gets the API's maximum."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _chat_request_body(settings: Settings) -> dict[str, Any]:
    """``/api/chat`` reads its body itself (JSON or multipart), so its schema is declared here."""
    from fastapi_app.routes.chat import ChatRequest

    schema = ChatRequest.model_json_schema()
    properties = schema["properties"]
    properties["model"] = {"anyOf": [{"enum": settings.models}, {"type": "null"}], **_doc(properties["model"])}
    properties["image"] = {
        "anyOf": [
            {
                "type": "string",
                "format": "image-base64",
                "contentEncoding": "base64",
                "contentMediaType": "image/*",
                "description": "an image file (PNG, JPEG, WebP, GIF, BMP) in padded standard base64, or a "
                "data:image/...;base64, URL of one",
            },
            {"const": "", "description": "no image"},
            {"type": "null"},
        ],
        **_doc(properties["image"]),
    }
    _with_maximum(properties["max_tokens"], settings.max_tokens_cap)
    # multipart: text fields, the image as a file; an empty optional field counts as unset
    form = {"type": "object", "required": ["prompt"], "properties": {}}
    for name, field in properties.items():
        branches = [b for b in field.get("anyOf", [field]) if b.get("type") != "null"]
        value = {"type": "string", "format": "image-file"} if name == "image" else branches[0]
        if name != "prompt":
            value = {"anyOf": [value, {"const": ""}]}
        form["properties"][name] = {**value, **_doc(field)}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": schema},
            "multipart/form-data": {"schema": form},
        },
    }


def _doc(field: dict[str, Any]) -> dict[str, Any]:
    return {k: field[k] for k in ("title", "description") if k in field}


UNSUPPORTED_BY_MOONDREAM2 = (  # and n above 1
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "logit_bias",
)


GUIDES = ("response_format", "guided_json", "guided_regex", "guided_choice")


# the values that ask for nothing (the engine's defaults): sent explicitly, as many clients do
# (frequency_penalty 0), they are accepted where the option is not served
NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "repetition_penalty": 1,
    "logprobs": False,
    "stop": [],
    "logit_bias": {},
}


def _unset_or_neutral(name: str) -> dict[str, Any]:
    return {"anyOf": [NULL, {"const": NEUTRAL[name]}]} if name in NEUTRAL else NULL


def _both(a: str, b: str) -> dict[str, Any]:
    """Both ``a`` and ``b`` sent (not null): one structured-output field at most per request.
    (A response_format of type text counts too: a nuance the generators could not take.)"""
    return {"required": [a, b], "properties": {a: {"not": NULL}, b: {"not": NULL}}}


def _requests(schema: dict[str, Any], settings: Settings) -> None:
    components = schema["components"]["schemas"]
    components.update(copy.deepcopy(MESSAGE_SCHEMAS))
    components["UserMessage"]["properties"]["content"]["anyOf"][1]["maxContains"] = settings.max_images
    completion = components["ChatCompletionRequest"]["properties"]
    completion["model"]["enum"] = settings.models
    completion["messages"] = _messages_schema(settings.max_images)
    for name in ("max_tokens", "max_completion_tokens"):
        _with_maximum(completion[name], settings.max_tokens_cap)
    _with_maximum(completion["n"], settings.max_n)
    # logit_bias: ids every served checkpoint has, biases in [-100, 100] (fastapi_app.schemas.LOGIT_BIAS)
    completion["logit_bias"] = {**LOGIT_BIAS, **_doc(completion["logit_bias"])}
    # top_logprobs (any number) only with logprobs: true, as OpenAI has it (dependentSchemas, not
    # if/then: schemathesis can generate from the document only while its rules stay few)
    components["ChatCompletionRequest"]["dependentSchemas"] = {
        "top_logprobs": {
            "anyOf": [
                {"properties": {"top_logprobs": NULL}},
                {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
            ]
        }
    }
    components["ChatCompletionRequest"]["allOf"] = [
        {  # moondream2 runs its own generation code: none of the per-row sampling options
            "if": {"properties": {"model": {"const": "moondream2"}}, "required": ["model"]},
            "then": {
                "properties": {name: _unset_or_neutral(name) for name in UNSUPPORTED_BY_MOONDREAM2}
                | {"n": {"const": 1}}
                | {"response_format": {"anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}}
            },
        },
        {"not": {"anyOf": [_both(a, b) for a, b in itertools.combinations(GUIDES, 2)]}},  # one guide at most
    ]
    completion["tools"] = {"anyOf": [{"type": "array", "minItems": 1, "maxItems": 128, "items": ref("Tool")}, NULL]}
    completion["tool_choice"] = {"anyOf": [{"enum": ["none", "auto", "required"]}, NAMED_TOOL, NULL]}
    without = [m for m in settings.models if MODELS[m][0] not in TOOL_FORMAT]
    if without:
        components["ChatCompletionRequest"]["allOf"].append(_no_tools(without))
    single = [m for m in settings.models if MODELS[m][0] not in MULTI_IMAGE]
    if single:
        components["ChatCompletionRequest"]["allOf"].append(_one_image(single))
    # last: schemathesis's canonicaliser gives up on some orders of these rules (tried; keep it last)
    components["ChatCompletionRequest"]["allOf"].append(
        {  # a tool_choice other than "none" needs tools
            "if": {
                "properties": {"tool_choice": {"not": {"anyOf": [NULL, {"const": "none"}]}}},
                "required": ["tool_choice"],
            },
            "then": {"properties": {"tools": {"type": "array"}}, "required": ["tools"]},
        }
    )
    components["ResponseFormat"]["allOf"] = [
        {
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {"required": ["json_schema"], "properties": {"json_schema": {"not": {"type": "null"}}}},
        }
    ]
    schema["paths"]["/api/chat"]["post"]["requestBody"] = _chat_request_body(settings)


def _responses(schema: dict[str, Any]) -> None:
    """Success bodies, SSE for the chat routes, and the link from a chat to its session."""
    schema["components"]["schemas"].update(RESPONSE_SCHEMAS)
    paths = schema["paths"]
    for (path, method), name in SUCCESS.items():
        paths[path][method]["responses"]["200"]["content"] = {"application/json": {"schema": ref(name)}}
    for path in ("/v1/chat/completions", "/api/chat"):
        paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    session = {"session_id": "$response.body#/session_id"}
    paths["/api/chat"]["post"]["responses"]["200"]["links"] = {
        "GetSession": {"operationId": "get_session", "parameters": session},
        "DeleteSession": {"operationId": "delete_session", "parameters": session},
    }


def _security(schema: dict[str, Any]) -> None:
    """With API keys on: a bearer scheme on every /v1 and /api operation."""
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        if path.startswith(("/v1/", "/api/")):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


def document(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _requests(schema, app.state.settings)
    _responses(schema)
    openapi_protocols.add(schema, app.state.settings)
    if app.state.api_keys:
        _security(schema)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            if path.startswith(("/v1/", "/api/")):
                for status in GENERAL:
                    responses.setdefault(status, _error(path, status))
            if path == "/api/chat":
                responses["409"] = _error(path, "409")
            if path == "/health/ready":
                body = {"type": "object", "properties": {"status": {"type": "string"}, "not_ready": {"type": "array"}}}
                responses["503"] = {
                    "description": "not ready: Triton down or restarting, or the models in not_ready being reloaded",
                    "content": {"application/json": {"schema": body}},
                }
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
