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


@schemathesis.hook
def filter_body(context, body) -> bool:
    """Leave out chat completions whose ``tool_choice`` names a function that is not among their
    ``tools``: the one rule of the request that a JSON schema cannot state (a 400, tested in
    tests/fastapi_app/test_openai_tools.py)."""
    if not isinstance(body, dict) or not isinstance(body.get("tool_choice"), dict):
        return True
    function = body["tool_choice"].get("function")
    name = function.get("name") if isinstance(function, dict) else None
    tools = body.get("tools")
    if not isinstance(name, str) or not isinstance(tools, list):
        return True
    names = {
        t.get("function", {}).get("name") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    }
    return name in names
