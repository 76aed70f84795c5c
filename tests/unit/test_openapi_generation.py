"""Every request body of the OpenAPI document is one schemathesis can generate from: its
schema canonicaliser gives up on some combinations of if/then/not rules, and the contract
test then fails on that operation. Checked here in seconds, before a stack runs."""

from __future__ import annotations

import warnings

import pytest
import schemathesis
from schemathesis import GenerationMode

from fastapi_app.main import create_app
from fastapi_app.settings import Settings


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize(("path", "method"), [("/v1/chat/completions", "POST"), ("/api/chat", "POST")])
def test_request_bodies_can_be_generated(path, method, mode):
    doc = create_app(Settings(inference_backend="local", local_models="")).openapi()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        operation = schemathesis.openapi.from_dict(doc)[path][method]
        operation.as_strategy(generation_mode=mode).example()  # raises UnsupportedSchema when it cannot
