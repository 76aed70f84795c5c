"""Bad input gets a 4xx that says what is wrong; neighbours in a batch and the server are unharmed."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import image_bytes
from tests.integration.helpers import GREEDY, infer_http, inputs, text_of

GOOD_PROMPT = "What is in this image?"


def _expect_400(triton, model, tensors, says):
    client = httpclient.InferenceServerClient(triton.http_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, tensors)
    error = caught.value
    assert str(error.status()) in {"400", "404"}, f"status {error.status()}: {error.message()}"
    assert says.lower() in error.message().lower(), error.message()
    assert client.is_server_ready() and client.is_model_ready("llava_stream")


@pytest.mark.parametrize(
    ("case", "prompt", "image", "params", "says"),
    [
        ("not an image", GOOD_PROMPT, b"this is plain text, not a PNG", {}, "not a recognised image"),
        ("truncated PNG", GOOD_PROMPT, "truncated", {}, "truncated"),
        ("empty image", GOOD_PROMPT, b"", {}, "image is empty"),
        ("over the pixel limit", GOOD_PROMPT, "huge", {}, "MAX_IMAGE_PIXELS"),
        ("empty prompt", "   ", "png", {}, "prompt is empty"),
        ("prompt over the token limit", "describe " * 800, "png", {}, "MAX_PROMPT_TOKENS"),
        ("max_tokens 0", GOOD_PROMPT, "png", {"max_tokens": 0}, "max_tokens must be between 1 and 64"),
        ("max_tokens above the cap", GOOD_PROMPT, "png", {"max_tokens": 65}, "max_tokens must be between 1 and 64"),
        ("negative temperature", GOOD_PROMPT, "png", {"temperature": -0.5}, "temperature must be between 0 and 2"),
        ("top_p above 1", GOOD_PROMPT, "png", {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ],
)
@pytest.mark.parametrize("model", ["llava", "moondream2"])
def test_bad_request_gets_400_saying_what_is_wrong(triton, png, model, case, prompt, image, params, says):
    if image == "png":
        image = png
    elif image == "truncated":
        image = png[: len(png) // 2]
    elif image == "huge":
        image = image_bytes((1100, 1000), "PNG")
    _expect_400(triton, model, inputs(httpclient, prompt, image, **params), says)


def test_wrong_datatype_is_rejected_by_triton(triton, png):
    tensors = inputs(httpclient, None, png)
    prompt = httpclient.InferInput("prompt", [1, 1], "INT32")
    prompt.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    _expect_400(triton, "llava", [prompt, *tensors], "data-type is 'INT32', but model 'llava' expects 'BYTES'")


def test_unknown_model_is_rejected(triton, png):
    _expect_400(triton, "gpt-4-vision", inputs(httpclient, GOOD_PROMPT, png), "unknown model")


@pytest.mark.parametrize("model", ["llava", "kosmos2"])
def test_bad_request_in_a_batch_fails_alone(triton, model, png):
    images = [image_bytes((64 + 16 * i, 64), "PNG") for i in range(8)]
    images[3] = b"\x89PNG\r\n\x1a\n broken"
    prompts = [f"Describe picture number {i}." for i in range(8)]
    alone = {
        i: infer_http(triton.http_url, model, prompts[i], images[i], max_tokens=8, **GREEDY) for i in range(8) if i != 3
    }
    client = httpclient.InferenceServerClient(triton.http_url, concurrency=8)
    pending = [
        client.async_infer(model, inputs(httpclient, prompts[i], images[i], max_tokens=8, **GREEDY)) for i in range(8)
    ]
    for i, request in enumerate(pending):
        if i == 3:
            with pytest.raises(InferenceServerException, match="not a recognised image"):
                request.get_result()
        else:
            assert text_of(request.get_result()) == alone[i]
    assert client.is_server_ready()
