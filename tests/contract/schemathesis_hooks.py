"""schemathesis hooks (``SCHEMATHESIS_HOOKS=tests.contract.schemathesis_hooks``): the OpenAPI
document's custom formats, generated as values the service must accept: images as real small
PNG, JPEG and WebP files, regexes that llguidance compiles."""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    size = (draw(st.integers(1, 48)), draw(st.integers(1, 48)))
    color = tuple(draw(st.integers(0, 255)) for _ in range(3))
    kind = draw(st.sampled_from(FORMATS))
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind)
    return kind, buffer.getvalue()


def _data_url(image: tuple[str, bytes]) -> str:
    kind, data = image
    return f"data:{MIME[kind]};base64,{base64.b64encode(data).decode()}"


schemathesis.openapi.format("image-data-url", image_files().map(_data_url))
schemathesis.openapi.format("image-base64", image_files().map(lambda image: base64.b64encode(image[1]).decode()))
schemathesis.openapi.format("image-file", image_files().map(lambda image: image[1]))

# guided_regex: a regex in llguidance's dialect (a JSON schema cannot say which strings compile;
# one that does not is a 400, tested in tests/fastapi_app/test_openai_structured.py)
REGEX_PARTS = ("[a-z]", "[0-9]", "\\d", "(yes|no)", "x", " ", "[A-Z]{2}", "(ab)*", "[^\\n]")
schemathesis.openapi.format(
    "llguidance-regex",
    st.lists(
        st.sampled_from(REGEX_PARTS).flatmap(lambda p: st.sampled_from((p, p + "+", p + "?"))), min_size=1, max_size=6
    ).map("".join),
)


def _compiles(schema: object) -> bool:
    """Whether llguidance (the service's structured-output library) takes ``schema``: a JSON
    schema with a keyword it does not implement (``if``, ``not``, ``contains``, ...) or a
    keyword of the wrong type is a 400 that says so (tests/unit/test_structured_output.py)."""
    from llguidance import LLMatcher

    from vlm_engine.guided import JSON_DEFAULTS

    try:
        return not LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS))
    except Exception:
        return False


def _guides_compile(body: dict) -> bool:
    schemas = [body.get("guided_json")]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        schemas.append(response_format["json_schema"].get("schema"))
    for outer, inner in (("text", "format"), ("output_config", "format")):  # Responses', Anthropic's
        options = body.get(outer)
        if isinstance(options, dict) and isinstance(options.get(inner), dict):
            schemas.append(options[inner].get("schema"))
    if _constrains_tools(body.get("tool_choice")) and isinstance(body.get("tools"), list):
        for tool in body["tools"]:  # their parameters become the answer's grammar
            if isinstance(tool, dict):
                function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
                schemas.append(function.get("parameters", function.get("input_schema")))
    return all(_compiles(schema) for schema in schemas if isinstance(schema, dict))


def _constrains_tools(choice: object) -> bool:
    """A tool_choice that makes the answer a call (chat's "required" or a named function,
    Anthropic's "any" or "tool"): the tools' schemas are compiled then."""
    if choice == "required":
        return True
    return isinstance(choice, dict) and choice.get("type") in ("function", "any", "tool")


def _named_tool(body: dict) -> tuple[str | None, set]:
    """The function ``tool_choice`` names, and the tools' names, in chat's, Responses' or
    Anthropic's shape (``None``: it names none)."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list):
        return None, set()
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else choice.get("name")
    names = set()
    for tool in tools:
        if isinstance(tool, dict):
            inner = tool.get("function")
            names.add(inner.get("name") if isinstance(inner, dict) else tool.get("name"))
    return (name if isinstance(name, str) else None), names


@schemathesis.hook
def filter_body(context, body) -> bool:
    """Leave out requests that break the two rules a JSON schema cannot state (each a 400,
    tested elsewhere): a ``tool_choice`` naming a function that is not among the ``tools``
    (tests/fastapi_app/test_openai_tools.py), and a JSON schema llguidance cannot compile
    (``_compiles``); in chat's, Responses' and Anthropic's shapes alike."""
    if not isinstance(body, dict):
        return True
    if not _guides_compile(body):
        return False
    name, names = _named_tool(body)
    return name is None or name in names
