"""KServe v2 without Triton (issue 20): with ``INFERENCE_BACKEND=local`` the service answers
Triton's HTTP API itself. The unmodified ``tritonclient.http`` gets the same answers, metadata
and errors from it as from a real tritonserver, for every model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import image_bytes
from tests.integration.helpers import GREEDY, MODELS, inputs, stream_http, text_of

PROMPT = "What is in this image?"


def hostport(url: str) -> str:
    return url.split("://", 1)[-1]


@pytest.fixture(scope="module")
def servers(triton, local_api):
    """(Triton, the local service) as tritonclient addresses."""
    return triton.http_url, hostport(local_api.url)


@pytest.mark.parametrize("model", MODELS)
def test_infer_answers_as_triton_does(servers, model, png):
    """Binary tensors both ways (tritonclient's default), the same greedy text and outputs."""
    answers = []
    for url in servers:
        result = httpclient.InferenceServerClient(url).infer(
            model, inputs(httpclient, PROMPT, png, max_tokens=12, **GREEDY)
        )
        outputs = {o["name"]: o["datatype"] for o in result.get_response()["outputs"]}
        answers.append((text_of(result), outputs, result.as_numpy("generated_text").shape))
    assert answers[1] == answers[0]
    assert answers[1][0], "an answer (gibberish from the tiny random-weight checkpoints, but the same)"


def test_json_tensors_both_ways(servers, jpeg):
    """Inputs and outputs as JSON data instead of the binary extension."""
    texts = []
    for url in servers:
        tensors = inputs(httpclient, PROMPT, jpeg, binary=False, max_tokens=10, **GREEDY)
        result = httpclient.InferenceServerClient(url).infer(
            "llava", tensors, outputs=[httpclient.InferRequestedOutput("generated_text", binary_data=False)]
        )
        output = result.get_output("generated_text")
        assert "parameters" not in output and isinstance(output["data"][0], str), "JSON data, not binary"
        texts.append(output["data"][0])
    assert texts[1] == texts[0]


def test_kosmos2_entities_match(servers, png):
    found = []
    for url in servers:
        result = httpclient.InferenceServerClient(url).infer(
            "kosmos2", inputs(httpclient, "<grounding> An image of", png, max_tokens=16, **GREEDY)
        )
        found.append(json.loads(result.as_numpy("entities").reshape(-1)[0]))
    assert found[1] == found[0]


@pytest.mark.parametrize("model", MODELS)
def test_metadata_and_config_match(servers, model):
    for name in (model, f"{model}_stream"):
        metadata = [httpclient.InferenceServerClient(url).get_model_metadata(name) for url in servers]
        for key in ("inputs", "outputs", "name", "versions"):
            assert metadata[1][key] == metadata[0][key], (name, key)
        configs = [httpclient.InferenceServerClient(url).get_model_config(name) for url in servers]
        for key in ("input", "output", "max_batch_size"):
            assert configs[1][key] == configs[0][key], (name, key)
    local = httpclient.InferenceServerClient(servers[1])
    assert local.is_server_live() and local.is_server_ready() and local.is_model_ready(model)
    assert not local.is_model_ready("gpt-4-vision")


def test_generate_and_generate_stream_answer_as_triton_does(servers, png):
    body = {"prompt": "Describe the picture.", "image": list(png), "max_tokens": 12, "temperature": 0.0}
    plain = [requests.post(f"http://{url}/v2/models/llava/generate", json=body, timeout=120).json() for url in servers]
    assert plain[1] == plain[0] and plain[1]["generated_text"]
    streams = [stream_http(url, "llava_stream", body) for url in servers]
    texts = [[event["generated_text"] for _, event in events] for events in streams]
    # how the text is cut into events depends on timing (Triton's sender joins what piled up
    # while it was busy): the events join to the same answer on both, the answer generate gave
    assert "".join(texts[1]) == "".join(texts[0]) == plain[1]["generated_text"]
    finals = [events[-1][1] for events in streams]
    for key in ("prompt_tokens", "output_tokens", "finish_reason", "model_name"):
        assert finals[1][key] == finals[0][key], key


def _error(url: str, model: str, tensors) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        httpclient.InferenceServerClient(url).infer(model, tensors)
    return caught.value


@pytest.mark.parametrize(
    ("case", "model", "build", "says"),
    [
        ("not an image", "llava", lambda png: inputs(httpclient, PROMPT, b"plain text"), "not a recognised image"),
        ("empty prompt", "moondream2", lambda png: inputs(httpclient, "  ", png), "prompt is empty"),
        (
            "max_tokens above the cap",
            "llava",
            lambda png: inputs(httpclient, PROMPT, png, max_tokens=65),
            "max_tokens must be between 1 and 64",
        ),
        ("unknown model", "gpt-4-vision", lambda png: inputs(httpclient, PROMPT, png), "unknown model"),
        (
            "over the pixel limit",
            "llava",
            lambda png: inputs(httpclient, PROMPT, image_bytes((1100, 1000), "PNG")),
            "MAX_IMAGE_PIXELS",
        ),
    ],
)
def test_bad_input_is_refused_as_triton_refuses_it(servers, png, case, model, build, says):
    errors = [_error(url, model, build(png)) for url in servers]
    assert errors[1].status() == errors[0].status(), case
    for error in errors:
        assert str(error.status()) in {"400", "404"}, (case, error.status(), error.message())
        assert says.lower() in error.message().lower(), (case, error.message())


def test_wrong_datatype_and_missing_input(servers, png):
    for url in servers:
        prompt = httpclient.InferInput("prompt", [1, 1], "INT32")
        prompt.set_data_from_numpy(np.array([[7]], dtype=np.int32))
        error = _error(url, "llava", [prompt, *inputs(httpclient, None, png)])
        assert "data-type is 'INT32', but model 'llava' expects 'BYTES'" in error.message()
    local = servers[1]
    error = _error(local, "llava", inputs(httpclient, PROMPT, None))
    assert str(error.status()) == "400" and "image" in error.message()
    reply = requests.post(f"http://{local}/v2/models/llava_stream/infer", json={"inputs": []}, timeout=30)
    assert reply.status_code == 400 and "generate_stream" in reply.json()["error"]


def test_api_keys_guard_the_kserve_face(tiny_models_dir, tmp_path_factory, png):
    """With API_KEYS, the service's KServe models need the key as /v1 does; health stays open."""
    from tests.conftest import TRITON_ENV
    from tests.fastapi_app.conftest import ApiProcess, api_env

    env = api_env(
        tmp_path_factory,
        INFERENCE_BACKEND="local",
        SERVED_MODELS="llava",
        VLM_MODELS_DIR=str(tiny_models_dir),
        HF_HUB_OFFLINE="1",
        API_KEYS="sesame",
        **TRITON_ENV,
    )
    server = ApiProcess("api-local-keys", env).start()
    try:
        url = hostport(server.url)
        assert httpclient.InferenceServerClient(url).is_server_ready()
        error = _error(url, "llava", inputs(httpclient, PROMPT, png, max_tokens=4))
        assert str(error.status()) == "401" and "API key" in error.message()
        keyed = httpclient.InferenceServerClient(url)
        result = keyed.infer(
            "llava", inputs(httpclient, PROMPT, png, max_tokens=4), headers={"Authorization": "Bearer sesame"}
        )
        assert text_of(result)
    finally:
        server.stop()


def test_the_face_answers_once(servers, png):
    """``n`` > 1 in sampling_parameters is for ``<model>_stream``; the face refuses it, on both."""
    for url in servers:
        tensors = inputs(httpclient, PROMPT, png, max_tokens=4)
        sampling = httpclient.InferInput("sampling_parameters", [1, 1], "BYTES")
        sampling.set_data_from_numpy(np.array([[b'{"n": 2}']], dtype=np.object_))
        error = _error(url, "llava", [*tensors, sampling])
        assert str(error.status()) == "400" and "answers once" in error.message(), error.message()


GOOD_PROMPT = {"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": ["hi"]}


@pytest.mark.parametrize(
    ("case", "body", "says"),
    [
        ("input parameters a list", {"inputs": [{**GOOD_PROMPT, "parameters": [1]}]}, "'parameters' must be"),
        ("request parameters a list", {"inputs": [GOOD_PROMPT], "parameters": [1]}, "'parameters' must be"),
        ("outputs not objects", {"inputs": [GOOD_PROMPT], "outputs": ["text"]}, "'outputs' must be"),
        (
            "binary_data_size not a count",
            {"inputs": [{**GOOD_PROMPT, "parameters": {"binary_data_size": "x"}}]},
            "binary_data_size must be",
        ),
    ],
)
def test_malformed_kserve_json_is_a_400_there_as_in_triton(servers, case, body, says):
    # each was an AttributeError or ValueError answered as 500 by the service. Triton refuses
    # them all too, but the two top-level ones with a 500 ("failed to get request params",
    # "Unable to parse 'name'"); the service says 400: the request is what must change
    triton, local = (requests.post(f"http://{url}/v2/models/llava/infer", json=body, timeout=60) for url in servers)
    assert triton.status_code in (400, 500) and "error" in triton.json(), (case, triton.text)
    assert local.status_code == 400 and says in local.json()["error"], (case, local.text)
