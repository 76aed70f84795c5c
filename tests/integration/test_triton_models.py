"""The model repository against a real tritonserver: metadata, infer, batching, streaming."""

from __future__ import annotations

import json
import time

import pytest
import tritonclient.http as httpclient

from tests.conftest import image_bytes, start_triton
from tests.integration.helpers import (
    GREEDY,
    MODELS,
    infer_grpc,
    infer_http,
    inputs,
    metric,
    stream_grpc,
    stream_http,
    text_of,
)
from vlm_engine.tiny.samples import PROMPTS

SIZES = [(64, 64), (224, 224), (300, 120), (97, 211), (500, 400), (32, 48), (160, 160), (640, 360)]


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_with_documented_metadata(triton, model):
    client = httpclient.InferenceServerClient(triton.http_url)
    assert client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(f"{model}_stream")
    meta = client.get_model_metadata(model)
    got_inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert got_inputs == {
        "prompt": "BYTES",
        "image": "UINT8",
        "max_tokens": "INT32",
        "temperature": "FP32",
        "top_p": "FP32",
        "sampling_parameters": "BYTES",
    }
    got_outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    expected = {"generated_text": "BYTES", "logprobs": "BYTES"}
    expected |= {"entities": "BYTES"} if model in ("kosmos2", "moondream2") else {}
    assert got_outputs == expected
    stream_inputs = {i["name"] for i in client.get_model_metadata(f"{model}_stream")["inputs"]}
    assert {"prompt", "image", "messages"} <= stream_inputs


@pytest.mark.parametrize("model", MODELS)
def test_infer_http_and_grpc_with_png_and_jpeg(triton, model, png, jpeg):
    for infer, url in ((infer_http, triton.http_url), (infer_grpc, triton.grpc_url)):
        for image in (png, jpeg):
            text = infer(url, model, "What is in this image?", image, max_tokens=8, **GREEDY)
            assert isinstance(text, str) and text.strip(), f"{model} answered empty text via {infer.__name__}"


def test_kosmos2_returns_grounded_entities_as_json(triton, png):
    client = httpclient.InferenceServerClient(triton.http_url)
    result = client.infer("kosmos2", inputs(httpclient, "An image of", png, max_tokens=8, **GREEDY))
    entities = json.loads(result.as_numpy("entities").reshape(-1)[0])
    assert isinstance(entities, list)
    for entity in entities:
        assert set(entity) == {"phrase", "span", "boxes"}


def _requests():
    return [
        (PROMPTS[i], image_bytes(SIZES[i], "PNG" if i % 2 else "JPEG", (30 * i, 90, 200 - 20 * i))) for i in range(8)
    ]


@pytest.mark.parametrize("model", MODELS)
def test_concurrent_requests_match_single_answers_and_reuse_cached_prompts(triton, model):
    """8 requests at once get their solo answers. Whether they share a step depends on how
    their arrivals fall; that rows share steps is checked where it is certain,
    beside a row that cannot end first (test_inflight_batching, test_scheduler)."""
    requests = _requests()
    alone = [infer_http(triton.http_url, model, p, img, max_tokens=12, **GREEDY) for p, img in requests]
    assert len(set(alone)) > 1, "different inputs should give different answers"
    hits = metric(triton.metrics_url, "vlm_prefix_cache_hit_tokens_total", model=model)
    client = httpclient.InferenceServerClient(triton.http_url, concurrency=8)
    pending = [client.async_infer(model, inputs(httpclient, p, img, max_tokens=12, **GREEDY)) for p, img in requests]
    together = [text_of(p.get_result()) for p in pending]
    assert together == alone
    hits = metric(triton.metrics_url, "vlm_prefix_cache_hit_tokens_total", model=model) - hits
    if model != "moondream2":  # its own KV, no prefix cache
        assert hits > 0, "the repeated prompts started on the pages their first answers cached"


@pytest.mark.parametrize("model", MODELS)
def test_generate_stream_chunks_join_to_the_greedy_answer(triton, model, png):
    expected = infer_http(triton.http_url, model, "Describe the picture.", png, max_tokens=16, **GREEDY)
    body = {"prompt": "Describe the picture.", "image": list(png), "max_tokens": 16, "temperature": 0.0}
    events = stream_http(triton.http_url, f"{model}_stream", body)
    texts = [event["generated_text"] for _, event in events]
    assert len([t for t in texts[:-1] if t]) >= 2, f"too few chunks before the last: {texts}"
    assert "".join(texts) == expected


def test_stream_gap_coalesces_a_fast_rows_text(tiny_models_dir, triton, png):
    """The stream models' ``stream_gap_ms`` (here LLAVA_STREAM_GAP_MS, which beats the shared
    0 of these tests): a row's first text at once, then nothing sooner than the gap after it,
    so an answer faster than the gap comes as two responses with the same text (a slower
    machine may send a piece more per second the answer takes)."""
    expected = infer_http(triton.http_url, "llava", "Describe the picture.", png, max_tokens=12, **GREEDY)
    gapped = start_triton(
        tiny_models_dir, "tritonserver-stream-gap.log", models=["llava_stream"], env={"LLAVA_STREAM_GAP_MS": "1000"}
    )
    try:
        body = {"prompt": "Describe the picture.", "image": list(png), "max_tokens": 12, "temperature": 0.0}
        started = time.monotonic()
        events = stream_http(gapped.http_url, "llava_stream", body)
    finally:
        gapped.stop()
    texts = [event["generated_text"] for _, event in events]
    seconds = events[-1][0] - started
    assert "".join(texts) == expected
    pieces = [t for t in texts if t]
    assert 2 <= len(pieces) <= 2 + int(seconds), f"the first text, then the rest at the end: {texts} ({seconds:.1f} s)"


@pytest.mark.parametrize("model", MODELS)
def test_grpc_stream_chunks_join_to_the_greedy_answer(triton, model, jpeg):
    expected = infer_grpc(triton.grpc_url, model, "What is this?", jpeg, max_tokens=16, **GREEDY)
    texts = stream_grpc(triton.grpc_url, f"{model}_stream", "What is this?", jpeg, max_tokens=16, **GREEDY)
    assert len([t for t in texts[:-1] if t]) >= 2, f"too few chunks before the last: {texts}"
    assert "".join(texts) == expected


def _chat(triton, messages, **parameters) -> list[dict]:
    body = {"text_input": json.dumps(messages), "parameters": parameters}
    return [json.loads(event["text_output"]) for _, event in stream_http(triton.http_url, "llm_decoupled", body)]


def test_llm_decoupled_streams_a_text_only_chat(triton):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    events = _chat(triton, messages, streaming=True, max_tokens=12, temperature=0.0)
    assert [e["type"] for e in events[:-1]] == ["chunk"] * (len(events) - 1) and len(events) >= 3
    assert events[-1] == {"type": "complete"}
    streamed = "".join(e["content"] for e in events[:-1])
    whole = _chat(triton, messages, streaming=False, max_tokens=12, temperature=0.0)
    assert whole == [{"type": "complete", "content": streamed}]


@pytest.mark.parametrize("model", MODELS)
def test_llm_decoupled_streams_an_image_chat(triton, model, png):
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in this image?"},
            ],
        }
    ]
    events = _chat(triton, messages, model=model, max_tokens=10, temperature=0.0)
    assert events[-1] == {"type": "complete"}
    chunks = [e["content"] for e in events if e["type"] == "chunk"]
    assert len(chunks) >= 2
    assert "".join(chunks) == infer_http(triton.http_url, model, "What is in this image?", png, max_tokens=10, **GREEDY)


@pytest.mark.parametrize(
    ("messages", "parameters", "says"),
    [
        ("not json", {}, "JSON"),
        ([{"role": "user", "content": "hi"}], {"model": "gpt-4"}, "unknown model"),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}},
                        {"type": "text", "text": "hi"},
                    ],
                }
            ],
            {},
            "remote image URLs",
        ),
        ([{"role": "user", "content": "hi"}], {"max_tokens": 0}, "max_tokens"),
    ],
)
def test_llm_decoupled_reports_errors_in_protocol(triton, messages, parameters, says):
    body = {"text_input": messages if isinstance(messages, str) else json.dumps(messages), "parameters": parameters}
    events = [json.loads(e["text_output"]) for _, e in stream_http(triton.http_url, "llm_decoupled", body)]
    assert events[-1]["type"] == "error" and says in events[-1]["content"], events


def test_model_instances_hold_one_copy_of_weights(triton):
    """The facades are forwarders: the weights live only in the <model>_stream processes."""
    config = httpclient.InferenceServerClient(triton.http_url).get_model_config("llava")
    assert config["parameters"]["stream_model"]["string_value"] == "llava_stream"
    assert "model_path" not in config.get("parameters", {})
    engine = httpclient.InferenceServerClient(triton.http_url).get_model_config("llava_stream")
    assert engine["model_transaction_policy"]["decoupled"] is True
    assert engine["parameters"]["max_waiting"]["string_value"] == "64"  # the scheduler bounds the queue
    assert all(g["kind"] == "KIND_MODEL" for g in engine["instance_group"])
