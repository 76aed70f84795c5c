"""Every request schema of the OpenAPI document is one schemathesis can generate from: its
canonicaliser gives up (kind "raw") on some combinations of if/then/not rules, and the
contract test then fails on that operation. Checked here in a second, before the stack runs."""

from __future__ import annotations

import copy

import jsonschema_rs
import pytest

from fastapi_app.main import create_app
from fastapi_app.settings import Settings


def resolved(doc: dict, schema):
    components = doc["components"]["schemas"]
    if isinstance(schema, dict):
        if set(schema) == {"$ref"}:
            return resolved(doc, copy.deepcopy(components[schema["$ref"].rsplit("/", 1)[-1]]))
        return {k: resolved(doc, v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [resolved(doc, v) for v in schema]
    return schema


@pytest.mark.parametrize("name", ["ChatCompletionRequest"])
def test_request_schemas_canonicalise(name):
    doc = create_app(Settings(inference_backend="local", local_models="")).openapi()
    schema = resolved(doc, doc["components"]["schemas"][name])
    canonical = jsonschema_rs.canonicalize(schema, draft=jsonschema_rs.Draft202012, validate_formats=True)
    assert str(canonical.kind).lower().rsplit(".", 1)[-1] != "raw", f"schemathesis cannot generate {name}"
