"""The OpenAPI document's parts for the Responses, Anthropic Messages and completions routes:
request shapes as the translation rooms accept them (so a request the document accepts is
never a 400, and one it refuses is), the success bodies, and each route's error shape.

The same rules as chat completions (``fastapi_app.openapi``): a user turn with text, images
only in user turns and counted per model, no tools for models without a tool format, no
per-row sampling options for moondream2."""

from __future__ import annotations

import copy
from typing import Any

from fastapi_app.schemas import IMAGE_DATA_URL, IMAGE_MEDIA_TYPES, TEXT, obj, ref
from fastapi_app.settings import Settings
from vlm_engine.chat import DETAILS
from vlm_engine.settings import MODELS, MULTI_IMAGE, TOOL_FORMAT
from vlm_engine.tools import NAME_PATTERN as TOOL_NAME

NULL = {"type": "null"}
STRING, COUNT = {"type": "string"}, {"type": "integer", "minimum": 0}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def _model_rule(models: list[str], then: dict[str, Any]) -> dict[str, Any]:
    return {"if": {"properties": {"model": {"enum": models}}, "required": ["model"]}, "then": then}


def _one_image(turn_with_image: dict[str, Any], image_part: dict[str, Any]) -> dict[str, Any]:
    """A conversation (array of turns) with at most one image in all: kosmos2 and moondream2."""
    one_part = {"type": "array", "contains": image_part, "minContains": 0, "maxContains": 1}
    return {
        "type": "array",
        "contains": turn_with_image,
        "minContains": 0,
        "maxContains": 1,
        "items": {"properties": {"content": {"anyOf": [STRING, one_part]}}},
    }


def _choice_needs_tools(field: str = "tool_choice") -> dict[str, Any]:
    return {
        "if": {"properties": {field: {"not": {"anyOf": [NULL, {"const": "none"}]}}}, "required": [field]},
        "then": {"properties": {"tools": {"type": "array"}}, "required": ["tools"]},
    }


# -- Responses ------------------------------------------------------------------------------------
R_INPUT_TEXT = obj(["type", "text"], type={"const": "input_text"}, text=STRING)
R_INPUT_IMAGE_DETAILS = [*DETAILS, "original"]
R_INPUT_IMAGE = obj(
    ["type", "image_url"],
    type={"const": "input_image"},
    image_url=IMAGE_DATA_URL,
    detail={"enum": R_INPUT_IMAGE_DETAILS},
)
R_OUTPUT_TEXT = obj(["type", "text"], type={"const": "output_text"}, text=STRING)
R_REFUSAL = obj(["type", "refusal"], type={"const": "refusal"}, refusal=STRING)
RESPONSES_SCHEMAS: dict[str, Any] = {
    "ResponseInputText": R_INPUT_TEXT,
    "ResponseInputImage": R_INPUT_IMAGE,
    "ResponseUserMessage": obj(
        ["role", "content"],
        type={"const": "message"},
        role={"const": "user"},
        content={
            "anyOf": [
                STRING,
                {"type": "array", "items": {"anyOf": [ref("ResponseInputText"), ref("ResponseInputImage")]}},
            ]
        },
    ),
    "ResponseOtherMessage": obj(
        ["role", "content"],
        type={"const": "message"},
        role={"enum": ["system", "developer"]},
        content={"anyOf": [STRING, {"type": "array", "items": {"anyOf": [R_INPUT_TEXT, R_OUTPUT_TEXT]}}]},
    ),
    "ResponseAssistantMessage": obj(
        ["role", "content"],
        type={"const": "message"},
        role={"const": "assistant"},
        content={"anyOf": [STRING, {"type": "array", "items": {"anyOf": [R_INPUT_TEXT, R_OUTPUT_TEXT, R_REFUSAL]}}]},
    ),
    "ResponseFunctionCall": obj(
        ["type", "call_id", "name", "arguments"],
        type={"const": "function_call"},
        id=STRING,
        call_id=STRING,
        name=STRING,
        arguments={"type": "string", "description": "JSON text"},
    ),
    "ResponseFunctionCallOutput": obj(
        ["type", "call_id", "output"], type={"const": "function_call_output"}, call_id=STRING, output=STRING
    ),
    "ResponseTool": obj(
        ["type", "name"],
        type={"const": "function"},
        name={"type": "string", "pattern": TOOL_NAME},
        description=_nullable(STRING),
        parameters={"type": "object", "description": "a JSON schema of the arguments"},
        strict={"anyOf": [{"type": "boolean"}, NULL]},
    ),
}
R_USER_WITH_TEXT = obj(
    ["role", "content"],
    type={"const": "message"},
    role={"const": "user"},
    content={
        "anyOf": [TEXT, {"type": "array", "contains": obj(["type", "text"], type={"const": "input_text"}, text=TEXT)}]
    },
)
R_WITH_IMAGE = obj(
    ["content"], type={"const": "message"}, content={"type": "array", "contains": ref("ResponseInputImage")}
)
R_TOOL_ITEM = obj(["type"], type={"enum": ["function_call", "function_call_output"]})


def _responses_request(component: dict[str, Any], settings: Settings, no_tools: list[str], single: list[str]) -> None:
    properties = component["properties"]
    properties["model"]["enum"] = settings.models
    items = {
        "anyOf": [
            ref("ResponseUserMessage"),
            ref("ResponseOtherMessage"),
            ref("ResponseAssistantMessage"),
            ref("ResponseFunctionCall"),
            ref("ResponseFunctionCallOutput"),
        ]
    }
    images = {"contains": R_WITH_IMAGE, "minContains": 0, "maxContains": settings.max_images}
    properties["input"] = {
        "anyOf": [
            TEXT,
            {"type": "array", "minItems": 1, "items": items, "allOf": [{"contains": R_USER_WITH_TEXT}, images]},
        ],
        "description": "a string, or items: messages (user: input_text, input_image; system, developer: "
        "input_text, output_text; assistant: those and refusal), function calls and their outputs; a user "
        "message with text among them",
    }
    _cap(properties["max_output_tokens"], settings.max_tokens_cap)
    properties["tools"] = _nullable({"type": "array", "minItems": 1, "maxItems": 128, "items": ref("ResponseTool")})
    properties["tool_choice"] = _nullable(
        {
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                obj(["type", "name"], type={"const": "function"}, name=STRING),
            ]
        }
    )
    rules = [_choice_needs_tools()]
    moondream = [m for m in settings.models if m == "moondream2"]
    if moondream:
        unset = {name: NULL for name in ("seed", "stop", "frequency_penalty", "presence_penalty")}
        text_only = {
            "anyOf": [NULL, {"properties": {"format": {"anyOf": [NULL, {"properties": {"type": {"const": "text"}}}]}}}]
        }
        rules.append(_model_rule(moondream, {"properties": {**unset, "text": text_only}}))
    if no_tools:
        no_tool_items = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"not": R_TOOL_ITEM}}]}
        then = {
            "properties": {"tools": NULL, "tool_choice": {"anyOf": [NULL, {"const": "none"}]}, "input": no_tool_items}
        }
        rules.append(_model_rule(no_tools, then))
    if single:
        one = {"anyOf": [{"type": "string"}, _one_image(R_WITH_IMAGE, ref("ResponseInputImage"))]}
        rules.append(_model_rule(single, {"properties": {"input": one}}))
    component["allOf"] = rules
    component["properties"]["text"] = _nullable(ref("TextOptions"))
    properties["reasoning"] = _nullable({"type": "object", "additionalProperties": NULL})
    properties["background"] = {"anyOf": [NULL, {"const": False}], "description": "only false"}


# -- Anthropic Messages ---------------------------------------------------------------------------
def _turn(role: str, *blocks: str) -> dict[str, Any]:
    """An Anthropic turn of ``role``: a string, or a list of these blocks; nothing else in it."""
    content = {"anyOf": [STRING, {"type": "array", "items": {"anyOf": [ref(block) for block in blocks]}}]}
    return {**obj(["role", "content"], role={"const": role}, content=content), "additionalProperties": False}


A_TEXT = obj(["type", "text"], type={"const": "text"}, text=STRING, cache_control={"description": "accepted; not used"})
A_IMAGE = obj(
    ["type", "source"],
    type={"const": "image"},
    source=obj(
        ["type", "media_type", "data"],
        type={"const": "base64"},
        media_type={"enum": list(IMAGE_MEDIA_TYPES)},
        data={"type": "string", "format": "image-base64"},
    ),
)
ANTHROPIC_SCHEMAS: dict[str, Any] = {
    "AnthropicTextBlock": A_TEXT,
    "AnthropicImageBlock": A_IMAGE,
    "AnthropicToolResultBlock": obj(
        ["type", "tool_use_id"],
        type={"const": "tool_result"},
        tool_use_id=STRING,
        content={"anyOf": [STRING, {"type": "array", "items": ref("AnthropicTextBlock")}]},
        is_error={"type": "boolean"},
    ),
    "AnthropicToolUseBlock": obj(
        ["type", "id", "name", "input"], type={"const": "tool_use"}, id=STRING, name=STRING, input={"type": "object"}
    ),
    "AnthropicUserTurn": _turn("user", "AnthropicTextBlock", "AnthropicImageBlock", "AnthropicToolResultBlock"),
    "AnthropicAssistantTurn": _turn("assistant", "AnthropicTextBlock", "AnthropicToolUseBlock"),
    "AnthropicTool": obj(
        ["name", "input_schema"],
        type={"const": "custom"},
        name={"type": "string", "pattern": TOOL_NAME},
        description=_nullable(STRING),
        input_schema={"type": "object", "description": "a JSON schema of the input"},
    ),
}
A_USER_WITH_TEXT = obj(
    ["role", "content"],
    role={"const": "user"},
    content={"anyOf": [TEXT, {"type": "array", "contains": obj(["type", "text"], type={"const": "text"}, text=TEXT)}]},
)
A_WITH_IMAGE = obj(["content"], content={"type": "array", "contains": ref("AnthropicImageBlock")})
A_TOOL_BLOCK = obj(["type"], type={"enum": ["tool_use", "tool_result"]})
A_TOOL_CHOICE = {
    "anyOf": [
        {**obj(["type"], type={"enum": ["auto", "any", "none"]}, disable_parallel_tool_use={"type": "boolean"})},
        obj(["type", "name"], type={"const": "tool"}, name=STRING, disable_parallel_tool_use={"type": "boolean"}),
    ]
}


def _anthropic_request(component: dict[str, Any], settings: Settings, no_tools: list[str], single: list[str]) -> None:
    properties = component["properties"]
    properties["model"]["enum"] = settings.models
    images = {"contains": A_WITH_IMAGE, "minContains": 0, "maxContains": settings.max_images}
    properties["messages"] = {
        "type": "array",
        "minItems": 1,
        "items": {"anyOf": [ref("AnthropicUserTurn"), ref("AnthropicAssistantTurn")]},
        "allOf": [{"contains": A_USER_WITH_TEXT}, images],
        "description": "user and assistant turns; a user turn with text among them; images (base64) in user turns",
    }
    properties["system"] = _nullable({"anyOf": [STRING, {"type": "array", "items": ref("AnthropicTextBlock")}]})
    properties["tools"] = _nullable({"type": "array", "minItems": 1, "maxItems": 128, "items": ref("AnthropicTool")})
    properties["tool_choice"] = _nullable(A_TOOL_CHOICE)
    properties["thinking"] = _nullable({**obj(["type"], type={"const": "disabled"}), "additionalProperties": False})
    rules = [  # a tool_choice other than {"type": "none"} needs tools
        {
            "if": {
                "properties": {"tool_choice": {"type": "object", "properties": {"type": {"not": {"const": "none"}}}}},
                "required": ["tool_choice"],
            },
            "then": {"properties": {"tools": {"type": "array"}}, "required": ["tools"]},
        }
    ]
    if "max_tokens" in properties:
        _cap(properties["max_tokens"], settings.max_tokens_cap)
        if "moondream2" in settings.models:
            unset = {"stop_sequences": NULL, "top_k": NULL}
            output = {"anyOf": [NULL, {"properties": {"format": NULL}}]}
            rules.append(_model_rule(["moondream2"], {"properties": {**unset, "output_config": output}}))
    if no_tools:
        no_tool_turns = {
            "items": {"properties": {"content": {"anyOf": [STRING, {"type": "array", "items": {"not": A_TOOL_BLOCK}}]}}}
        }
        then = {
            "properties": {
                "tools": NULL,
                "tool_choice": {"anyOf": [NULL, {"properties": {"type": {"const": "none"}}}]},
                "messages": no_tool_turns,
            }
        }
        rules.append(_model_rule(no_tools, then))
    if single:
        one = _one_image(A_WITH_IMAGE, ref("AnthropicImageBlock"))
        rules.append(_model_rule(single, {"properties": {"messages": one}}))
    component["allOf"] = rules


# -- completions ----------------------------------------------------------------------------------
def _completion_request(component: dict[str, Any], settings: Settings) -> None:
    from fastapi_app.schemas import LOGIT_BIAS

    properties = component["properties"]
    properties["model"]["enum"] = [m for m in settings.models if MODELS[m][0] != "moondream2"]
    properties["model"]["description"] = "a served model but moondream2 (its own code writes its prompts)"
    text = {**TEXT, "minLength": 1}
    properties["prompt"] = {
        "anyOf": [text, {"type": "array", "minItems": 1, "maxItems": 16, "items": text}],
        "description": properties["prompt"].get("description", ""),
    }
    _cap(properties["max_tokens"], settings.max_tokens_cap)
    for branch in properties["n"].get("anyOf", [properties["n"]]):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_n
    properties["logit_bias"] = {**LOGIT_BIAS, "description": properties["logit_bias"].get("description", "")}
    component["allOf"] = [  # echo with logprobs: the prompt's logprobs are not computed (a 400)
        {
            "if": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
            "then": {"properties": {"logprobs": NULL}},
        }
    ]


# -- success bodies -------------------------------------------------------------------------------
R_USAGE = obj(
    ["input_tokens", "output_tokens", "total_tokens"], input_tokens=COUNT, output_tokens=COUNT, total_tokens=COUNT
)
BODIES: dict[str, Any] = {
    "Response": obj(
        ["id", "object", "created_at", "status", "model", "output", "store"],
        id=STRING,
        object={"const": "response"},
        created_at={"type": "integer"},
        status={"enum": ["completed", "incomplete"]},
        model=STRING,
        output={"type": "array", "items": {"type": "object", "required": ["type"]}},
        store={"type": "boolean"},
        previous_response_id=_nullable(STRING),
        usage=_nullable(R_USAGE),
    ),
    "ResponseDeleted": obj(["id", "deleted"], id=STRING, object={"const": "response"}, deleted={"const": True}),
    "ResponseInputItems": obj(
        ["object", "data", "has_more"],
        object={"const": "list"},
        data={"type": "array", "items": {"type": "object", "required": ["type", "id"]}},
        first_id=_nullable(STRING),
        last_id=_nullable(STRING),
        has_more={"type": "boolean"},
    ),
    "AnthropicMessage": obj(
        ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        id=STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        model=STRING,
        content={"type": "array", "items": {"type": "object", "required": ["type"]}},
        stop_reason={"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]},
        stop_sequence=_nullable(STRING),
        usage=obj(["input_tokens", "output_tokens"], input_tokens=COUNT, output_tokens=COUNT),
    ),
    "AnthropicTokenCount": obj(["input_tokens"], input_tokens=COUNT),
    "AnthropicError": obj(
        ["type", "error"],
        type={"const": "error"},
        error=obj(["type", "message"], type=STRING, message=STRING),
    ),
    "Model": obj(["id", "object"], id=STRING, object={"const": "model"}, ready={"type": "boolean"}),
    "Completion": obj(
        ["id", "object", "created", "model", "choices", "usage"],
        id=STRING,
        object={"const": "text_completion"},
        created={"type": "integer"},
        model=STRING,
        choices={
            "type": "array",
            "minItems": 1,
            "items": obj(
                ["index", "text", "finish_reason"],
                index=COUNT,
                text=STRING,
                finish_reason={"enum": ["stop", "length"]},
                logprobs=_nullable({"type": "object"}),
            ),
        },
        usage=obj(["prompt_tokens", "completion_tokens"], prompt_tokens=COUNT, completion_tokens=COUNT),
    ),
}
SUCCESS = {
    ("/v1/responses", "post"): "Response",
    ("/v1/responses/{response_id}", "get"): "Response",
    ("/v1/responses/{response_id}", "delete"): "ResponseDeleted",
    ("/v1/responses/{response_id}/input_items", "get"): "ResponseInputItems",
    ("/v1/messages", "post"): "AnthropicMessage",
    ("/v1/messages/count_tokens", "post"): "AnthropicTokenCount",
    ("/v1/models/{model_id}", "get"): "Model",
    ("/v1/completions", "post"): "Completion",
}
STREAMED = ("/v1/responses", "/v1/messages", "/v1/completions")
SSE = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": STRING, "data": {"type": "string", "description": "a JSON event with its type"}},
    "description": "with stream: true, server-sent events (the protocol's event names)",
}


def _cap(field: dict[str, Any], maximum: int) -> None:
    for branch in field.get("anyOf", [field]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def add(schema: dict[str, Any], settings: Settings) -> None:
    """Fill in the new routes' request rules and success bodies in ``schema`` (in place)."""
    components = schema["components"]["schemas"]
    components.update(copy.deepcopy(RESPONSES_SCHEMAS) | copy.deepcopy(ANTHROPIC_SCHEMAS) | copy.deepcopy(BODIES))
    no_tools = [m for m in settings.models if MODELS[m][0] not in TOOL_FORMAT]
    single = [m for m in settings.models if MODELS[m][0] not in MULTI_IMAGE]
    if "ResponsesRequest" in components:
        _responses_request(components["ResponsesRequest"], settings, no_tools, single)
        text_format = components["TextFormat"]
        text_format["allOf"] = [
            {
                "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
                "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}},
            }
        ]
    if "CompletionRequest" in components:
        _completion_request(components["CompletionRequest"], settings)
    for name in ("MessagesRequest", "CountTokensRequest"):
        if name in components:
            _anthropic_request(components[name], settings, no_tools, single)
    if "OutputConfig" in components:  # effort: not served (a 400 for any value)
        components["OutputConfig"]["properties"]["effort"] = {**NULL, "description": "not served: one effort"}
    paths = schema["paths"]
    for (path, method), name in SUCCESS.items():
        if path in paths:
            paths[path][method]["responses"]["200"]["content"] = {"application/json": {"schema": ref(name)}}
    for path in STREAMED:
        if path in paths:
            paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE}
    # no links from POST /v1/responses to its GET and DELETE: a response made with store: false
    # is not kept (a 404 later), which a link would promise it is
