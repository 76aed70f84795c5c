"""Sampling options through Triton (issue 18): the stream models take a ``sampling_parameters``
JSON input (Triton's vLLM-backend convention), the KServe faces forward it, and the answers are
the in-process engine's for the same seed."""

from __future__ import annotations

import json

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.helpers import infer_http, inputs, stream_grpc, stream_http
from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.settings import resolve_settings
from vlm_engine.tools import parse_tool_calls

PROMPT = "Describe the picture."


def test_a_seed_through_the_kserve_face_repeats_and_matches_the_local_engine(triton, tiny_models_dir, png):
    def seeded(seed: int) -> str:
        return infer_http(
            triton.http_url, "llava", PROMPT, png, max_tokens=16, temperature=1.0, sampling={"seed": seed}
        )

    first = seeded(5)
    assert seeded(5) == first
    assert seeded(6) != first or seeded(7) != first
    engine = VLMEngine(resolve_settings("llava", env={"VLM_MODELS_DIR": str(tiny_models_dir), "WARMUP": "false"}))
    try:
        local = engine.generate([engine.prepare(single_turn(PROMPT, png), 16, 1.0, sampling={"seed": 5})])[0]
    finally:
        engine.close()
    assert local.text == first, "the local backend and Triton give the same answer for the same seed"


def test_a_stop_string_through_grpc_streaming(triton, jpeg):
    full = "".join(
        stream_grpc(triton.grpc_url, "qwen3-vl_stream", "What is this?", jpeg, max_tokens=24, temperature=0.0)
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    texts = stream_grpc(
        triton.grpc_url,
        "qwen3-vl_stream",
        "What is this?",
        jpeg,
        max_tokens=24,
        temperature=0.0,
        sampling={"stop": [stop]},
    )
    assert "".join(texts) == full[: full.index(stop)].rstrip()


def test_logprobs_come_with_generate_stream_and_the_face(triton, png):
    body = {"prompt": PROMPT, "image": list(png), "max_tokens": 8, "temperature": 0.0}
    body["sampling_parameters"] = json.dumps({"logprobs": True, "top_logprobs": 2})
    events = [event for _, event in stream_http(triton.http_url, "llava_stream", body)]
    entries = [entry for event in events for entry in json.loads(event.get("logprobs", "[]"))]
    assert len(entries) == int(events[-1]["output_tokens"]) == 8
    assert all(e["logprob"] == e["top_logprobs"][0]["logprob"] for e in entries)
    client = httpclient.InferenceServerClient(triton.http_url)
    result = client.infer(
        "llava",
        inputs(
            httpclient, PROMPT, png, max_tokens=8, temperature=0.0, sampling=json.loads(body["sampling_parameters"])
        ),
    )
    face = json.loads(result.as_numpy("logprobs").reshape(-1)[0])
    assert [e["token"] for e in face] == [e["token"] for e in entries]


@pytest.mark.parametrize(
    ("sampling", "says"),
    [({"frequency_penalty": 9}, "frequency_penalty"), ({"colour": 1}, "colour"), ([1, 2], "JSON object")],
)
def test_bad_sampling_parameters_are_a_400_that_names_them(triton, png, sampling, says):
    client = httpclient.InferenceServerClient(triton.http_url)
    tensors = inputs(httpclient, PROMPT, png, max_tokens=4)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("llava", [*tensors, *inputs(httpclient, None, None, sampling=sampling)])
    assert caught.value.status() == "400" and says in caught.value.message()


def test_llm_decoupled_passes_the_seed_on(triton):
    messages = [{"role": "user", "content": "Tell me a story."}]

    def chat(seed: int) -> str:
        body = {
            "text_input": json.dumps(messages),
            "parameters": {"streaming": False, "max_tokens": 12, "temperature": 1.0, "seed": seed},
        }
        return json.loads(stream_http(triton.http_url, "llm_decoupled", body)[-1][1]["text_output"])["content"]

    assert chat(3) == chat(3)
    assert chat(4) != chat(3) or chat(5) != chat(3)


def test_n_answers_from_generate_stream_carry_their_index_and_the_face_refuses_n(triton, png):
    body = {"prompt": PROMPT, "image": list(png), "max_tokens": 6, "temperature": 1.0}
    body["sampling_parameters"] = json.dumps({"n": 2, "seed": 9})
    events = [event for _, event in stream_http(triton.http_url, "llava_stream", body)]
    finals = {int(e["index"]): e for e in events if "output_tokens" in e}
    assert sorted(finals) == [0, 1]
    texts = {i: "".join(e["generated_text"] for e in events if int(e["index"]) == i) for i in (0, 1)}
    for i in (0, 1):
        alone = {**body, "sampling_parameters": json.dumps({"seed": 9 + i})}
        assert texts[i] == "".join(e["generated_text"] for _, e in stream_http(triton.http_url, "llava_stream", alone))
    client = httpclient.InferenceServerClient(triton.http_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("llava", inputs(httpclient, PROMPT, png, max_tokens=4, sampling={"n": 2}))
    assert caught.value.status() == "400" and "llava_stream" in caught.value.message()


def test_guides_and_tools_through_the_stream_model(triton, png):
    body = {"prompt": PROMPT, "image": list(png), "max_tokens": 64, "temperature": 0.0}
    body["sampling_parameters"] = json.dumps({"guide": {"choice": ["red", "green", "blue"]}})
    answer = "".join(e["generated_text"] for _, e in stream_http(triton.http_url, "qwen3-vl_stream", body))
    assert answer in ("red", "green", "blue")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "zoom",
                "parameters": {
                    "type": "object",
                    "properties": {"f": {"enum": [1, 2]}},
                    "required": ["f"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    body["sampling_parameters"] = json.dumps({"tools": tools, "tool_choice": "required", "parallel_tool_calls": False})
    answer = "".join(e["generated_text"] for _, e in stream_http(triton.http_url, "qwen3-vl_stream", body))
    content, calls = parse_tool_calls(answer)
    assert content is None and [c.name for c in calls] == ["zoom"] and json.loads(calls[0].arguments)["f"] in (1, 2)
