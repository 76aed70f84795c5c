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


def test_moondream2_may_send_neutral_values_of_the_options_it_lacks():
    # clients send frequency_penalty 0 and the like by default; the service takes them for
    # moondream2 (they ask for nothing), so the document must too (schemathesis found this)
    import jsonschema

    doc = create_app(Settings(inference_backend="local", local_models="")).openapi()
    validator = jsonschema.Draft202012Validator({**doc, "$ref": "#/components/schemas/ChatCompletionRequest"})
    base = {"model": "moondream2", "messages": [{"role": "user", "content": "hi"}]}
    neutral = {"frequency_penalty": 0.0, "presence_penalty": 0, "repetition_penalty": 1.0, "logprobs": False}
    assert validator.is_valid({**base, **neutral, "stop": []})
    for asked in ({"frequency_penalty": 0.5}, {"logprobs": True}, {"seed": 0}, {"stop": ["x"]}):
        assert not validator.is_valid({**base, **asked}), asked
    assert validator.is_valid({**base, "model": "llava", "frequency_penalty": 0.5})
