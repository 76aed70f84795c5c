"""moondream2 against a real tritonserver: grounding over KServe, bad captions fail alone,
exact token counts and the context limit on the stream model."""

from __future__ import annotations

import json

import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tokenizers import Tokenizer
from tritonclient.utils import InferenceServerException

from tests.conftest import image_bytes
from tests.integration.helpers import GREEDY, infer_http, inputs, text_of

MODEL = "moondream2"


def _entities(result) -> list[dict]:
    return json.loads(result.as_numpy("entities").reshape(-1)[0])


@pytest.mark.parametrize("module", [httpclient, grpcclient], ids=["http", "grpc"])
def test_detect_and_point_answer_with_entities_over_kserve(triton, png, module):
    client = module.InferenceServerClient(triton.http_url if module is httpclient else triton.grpc_url)
    detect = client.infer(MODEL, inputs(module, "/detect red car", png))
    (boxes,) = _entities(detect)
    assert boxes["phrase"] == "red car" and boxes["boxes"], boxes
    assert all(len(box) == 4 and all(0 <= v <= 1 for v in box) for box in boxes["boxes"])
    assert text_of(detect) == f"red car: {len(boxes['boxes'])} {'box' if len(boxes['boxes']) == 1 else 'boxes'}"
    point = client.infer(MODEL, inputs(module, "/point tree", png))
    (points,) = _entities(point)
    assert points["phrase"] == "tree" and all(len(p) == 2 for p in points["points"])
    assert _entities(client.infer(MODEL, inputs(module, "What is this?", png, max_tokens=4, **GREEDY))) == []


def test_a_caption_without_an_image_fails_alone_in_its_batch(triton):
    images = [image_bytes((64 + 16 * i, 64), "PNG") for i in range(6)]
    prompts = [f"Describe picture number {i}." for i in range(6)]
    prompts[2], images[2] = "/caption", None
    prompts[4] = "/caption gigantic"
    alone = {i: infer_http(triton.http_url, MODEL, prompts[i], images[i], max_tokens=8, **GREEDY) for i in (0, 1, 3, 5)}
    client = httpclient.InferenceServerClient(triton.http_url, concurrency=6)
    pending = [
        client.async_infer(MODEL, inputs(httpclient, prompts[i], images[i], max_tokens=8, **GREEDY)) for i in range(6)
    ]
    for i, request in enumerate(pending):
        if i == 2:
            with pytest.raises(InferenceServerException, match="/caption needs an image") as caught:
                request.get_result()
            assert caught.value.status() == "400"
        elif i == 4:
            with pytest.raises(InferenceServerException, match="short, normal, long"):
                request.get_result()
        else:
            assert text_of(request.get_result()) == alone[i]
    assert client.is_server_ready() and client.is_model_ready(MODEL)


@pytest.mark.parametrize("max_tokens", [1, 5, 20])
def test_token_counts_are_exact_on_the_stream_model(triton, max_tokens):
    reply = requests.post(
        f"http://{triton.http_url}/v2/models/{MODEL}_stream/generate",
        json={"prompt": "What is in this image?", "max_tokens": max_tokens, "temperature": 0.0, "stream": False},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    final = reply.json()
    assert (final["output_tokens"], final["finish_reason"]) == (max_tokens, "length")


def test_the_context_limit_is_refused_before_generation(triton, png, tiny_models_dir):
    """Image, prompt and max_tokens together past the context: 400 at once, nothing runs."""
    tokenizer = Tokenizer.from_file(str(tiny_models_dir / MODEL / "moondream" / "starmie-v1" / "tokenizer.json"))
    words = ["why"]
    while len(tokenizer.encode(" ".join(words)).ids) < 420:  # under the prompt limit, over the context with 64
        words.append("why")
    with pytest.raises(InferenceServerException, match="context is 512 positions") as caught:
        infer_http(triton.http_url, MODEL, " ".join(words), png, max_tokens=64)
    assert caught.value.status() == "400"
    assert infer_http(triton.http_url, MODEL, " ".join(words[:200]), png, max_tokens=8).strip()
