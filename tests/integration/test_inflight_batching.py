"""In-flight batching through a real tritonserver: rows join and leave at every step."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import image_bytes, start_triton
from tests.integration.helpers import GREEDY, MODELS, GrpcStream, infer_http, inputs, metric, text_of
from vlm_engine.tiny.samples import PROMPTS

SIZES = [(64, 64), (224, 224), (300, 120), (97, 211), (500, 400), (32, 48), (160, 160), (640, 360)]
DECODE_STEPS = "vlm_scheduler_step_seconds_count"
TOKENS = "vlm_scheduler_generated_tokens_total"


def _request(i: int) -> tuple[str, bytes, int]:
    image = image_bytes(SIZES[i], "PNG" if i % 2 else "JPEG", (30 * i, 90, 200 - 20 * i))
    return PROMPTS[i], image, 24 + 5 * i


@pytest.mark.parametrize("model", MODELS)
def test_rows_joining_a_running_batch_get_their_solo_answers(triton, model):
    """8 greedy requests, each sent once the previous one has produced text, with sampled
    rows mixed in, get exactly what each gets alone; the rows share decode steps."""
    requests = [_request(i) for i in range(8)]
    alone = [infer_http(triton.http_url, model, p, img, max_tokens=n, **GREEDY) for p, img, n in requests]
    assert len(set(alone)) == 8, "different inputs should give different answers"
    steps = metric(triton.metrics_url, DECODE_STEPS, model=model, kind="decode")
    tokens = metric(triton.metrics_url, TOKENS, model=model)
    streams, sampled = [], []
    for i, (prompt, image, max_tokens) in enumerate(requests):
        streams.append(GrpcStream(triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=max_tokens, **GREEDY))
        if i % 3 == 0:
            sampled.append(
                GrpcStream(triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=20, temperature=1.0, top_p=0.9)
            )
        streams[-1].first_text()
    assert [s.result() for s in streams] == alone
    for stream in sampled:
        stream.result()
    steps = metric(triton.metrics_url, DECODE_STEPS, model=model, kind="decode") - steps
    tokens = metric(triton.metrics_url, TOKENS, model=model) - tokens
    assert 0 < steps < tokens, f"{steps} decode steps for {tokens} tokens: rows never shared a step"


def test_kosmos2_rows_of_different_prompt_lengths_share_steps(triton):
    prompts = ["An image of", "A photo that shows a small red house next to a tall tree", "Describe"]
    png = image_bytes((120, 90), "PNG")
    alone = [infer_http(triton.http_url, "kosmos2", p, png, max_tokens=30, **GREEDY) for p in prompts]
    steps = metric(triton.metrics_url, DECODE_STEPS, model="kosmos2", kind="decode")
    with ThreadPoolExecutor(3) as pool:
        together = list(
            pool.map(lambda p: infer_http(triton.http_url, "kosmos2", p, png, max_tokens=30, **GREEDY), prompts)
        )
    steps = metric(triton.metrics_url, DECODE_STEPS, model="kosmos2", kind="decode") - steps
    assert together == alone
    assert steps < 3 * 29, f"{steps} decode steps for 3 answers of 30 tokens: no shared steps"


def _long_request(triton, model: str) -> tuple[str, bytes]:
    """A prompt and image whose greedy answer runs to the 64-token cap (no early stop)."""
    for i in range(8):
        prompt, image, _ = _request(i)
        stream = GrpcStream(triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=64, **GREEDY)
        stream.result()
        if stream.finish_reason == "length":
            return prompt, image
    raise AssertionError(f"no sample prompt makes {model} answer 64 tokens")


@pytest.mark.parametrize("model", ["llava", "kosmos2", "qwen3-vl"])
def test_a_short_request_sent_during_a_long_one_finishes_first(triton, model):
    prompt, image = _long_request(triton, model)
    long = GrpcStream(triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=64, **GREEDY)
    long.first_text()
    short = GrpcStream(triton.grpc_url, f"{model}_stream", "What is this?", image, max_tokens=3, **GREEDY)
    short.result()
    assert not long.done, "the short request waited for the long one"
    long.result()
    assert long.finish_reason == "length"


def test_a_cancelled_row_stops_while_its_neighbour_goes_on(triton):
    model = "llava"
    prompt, image = _long_request(triton, model)
    neighbour_prompt, neighbour_image, _ = _request(5)
    expected = infer_http(triton.http_url, model, neighbour_prompt, neighbour_image, max_tokens=40, **GREEDY)
    for _ in range(3):  # on a busy machine the doomed row can finish before the cancel lands: try again
        tokens = metric(triton.metrics_url, TOKENS, model=model)
        doomed = GrpcStream(triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=64, **GREEDY)
        doomed.first_text()
        neighbour = GrpcStream(
            triton.grpc_url, f"{model}_stream", neighbour_prompt, neighbour_image, max_tokens=40, **GREEDY
        )
        neighbour.first_text()
        doomed.cancel()
        assert neighbour.result() == expected
        deadline = time.monotonic() + 10
        while metric(triton.metrics_url, "vlm_scheduler_running_rows", model=model) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(triton.metrics_url, "vlm_scheduler_running_rows", model=model) == 0
        generated = metric(triton.metrics_url, TOKENS, model=model) - tokens
        if doomed.finish_reason != "length":
            break
    assert doomed.finish_reason != "length", "the doomed row always finished before its cancel arrived"
    assert generated < 64 + 40, f"{generated} tokens: the cancelled row ran to its end"


@pytest.fixture(scope="module")
def small_queue_triton(tiny_models_dir):
    """llava with one running row and two waiting places, so that the queue fills."""
    env = {"LLAVA_MAX_RUNNING": "1", "LLAVA_MAX_WAITING": "2"}
    server = start_triton(tiny_models_dir, "tritonserver-small-queue.log", models=["llava", "llava_stream"], env=env)
    yield server
    server.stop()


def test_a_full_queue_answers_503_at_once_and_the_server_stays_healthy(small_queue_triton, png):
    url = small_queue_triton.http_url

    def infer(i: int):
        start = time.monotonic()
        client = httpclient.InferenceServerClient(url, network_timeout=120)
        try:
            return text_of(client.infer("llava", inputs(httpclient, PROMPTS[i % 8], png, max_tokens=64, **GREEDY))), 0.0
        except InferenceServerException as exc:
            return exc, time.monotonic() - start

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(infer, range(12)))
    refused = [(e, s) for e, s in outcomes if isinstance(e, InferenceServerException)]
    answered = [t for t, _ in outcomes if isinstance(t, str)]
    assert refused and answered, outcomes
    for error, seconds in refused:
        assert error.status() == "503", (error.status(), error.message())
        assert "at capacity" in error.message() and "retry later" in error.message()
        assert seconds < 5, f"refused after {seconds:.1f}s, not at once"
    client = httpclient.InferenceServerClient(url)
    assert client.is_server_ready() and client.is_model_ready("llava_stream")
    assert text_of(client.infer("llava", inputs(httpclient, PROMPTS[0], png, max_tokens=4, **GREEDY)))


def test_kserve_infer_answers_a_short_request_before_a_long_one_sent_first(triton):
    """The face forwards every request at once and answers each when its own answer is done."""
    prompt, image = _long_request(triton, "llava")
    finished: dict[str, float] = {}

    def infer(name: str, text: str, max_tokens: int) -> None:
        infer_http(triton.http_url, "llava", text, image, max_tokens=max_tokens, **GREEDY)
        finished[name] = time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(infer, "long", prompt, 64)
        time.sleep(0.01)
        short = pool.submit(infer, "short", "What is this?", 2)
        long.result(), short.result()
    assert finished["short"] < finished["long"]
