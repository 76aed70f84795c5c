"""In-flight batching through a real tritonserver: rows join and leave at every step."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import HANG_S, LONG, LONG_MODELS, image_bytes, start_triton
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
    rows mixed in, get exactly what each gets alone. (A row may end before the next one
    arrives, so sharing steps is not certain here: the long-row tests below check it.)"""
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


def test_kosmos2_rows_of_different_prompt_lengths_share_steps(long_triton, long_trace):
    """Three kosmos2 prompts of different lengths, sent while a row that cannot end by itself
    runs, each get their solo answer, and every one of their decode steps is a step of that
    row (the engine's trace: a step's tokens share its time). A row that never ends makes the
    overlap certain, however fast the machine or the client."""
    prompts = ["An image of", "A photo that shows a small red house next to a tall tree", "Describe"]
    png = image_bytes((120, 90), "PNG")
    url, model = long_triton.grpc_url, "kosmos2_stream"

    def answer(prompt: str) -> str:
        return GrpcStream(url, model, prompt, png, max_tokens=30, **GREEDY).result()

    alone = [answer(p) for p in prompts]
    mark = long_trace.mark()
    anchor = GrpcStream(url, model, "Describe everything you see.", png, max_tokens=LONG, **GREEDY)
    try:  # the anchor never ends by itself: cancelled whatever happens, or it would run on into other tests
        anchor.first_text()
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(answer, prompts))
    finally:
        anchor.cancel()
    assert together == alone
    rows = long_trace.wait(mark, 4)
    [running] = [row for row in rows if row["end"] == "cancelled"]
    steps = set(running["token_times"])
    for row in rows:
        if row is not running:  # its first token comes from its prompt's step; the rest are decode steps
            assert row["tokens"] == 30 and set(row["token_times"][1:]) <= steps, row["prompt_tokens"]
    assert len({row["prompt_tokens"] for row in rows if row is not running}) == 3


@pytest.mark.parametrize("model", LONG_MODELS)
def test_a_short_request_sent_during_a_long_one_finishes_first(long_triton, long_trace, model):
    """A row that cannot end by itself runs; a short request sent then is answered whole while
    it runs (it ends only when cancelled, after): the short one never waited behind it."""
    prompt, image, _ = _request(2)
    mark = long_trace.mark()
    long = GrpcStream(long_triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=LONG, **GREEDY)
    long.first_text()
    short = GrpcStream(long_triton.grpc_url, f"{model}_stream", "What is this?", image, max_tokens=3, **GREEDY)
    short.result()
    assert short.finish_reason == "length"
    long.cancel()
    short_row, long_row = long_trace.wait(mark, 2)
    assert (short_row["end"], short_row["tokens"]) == ("length", 3)
    # the long row ran before the short one came and ended (cancelled) only after it
    assert long_row["end"] == "cancelled" and long_row["token_times"][0] < short_row["submitted"]
    assert long_row["ended"] > short_row["ended"]


def test_a_cancelled_row_stops_while_its_neighbour_goes_on(long_triton, long_trace):
    model = "llava"
    prompt, image, _ = _request(2)
    neighbour_prompt, neighbour_image, _ = _request(5)
    expected = GrpcStream(
        long_triton.grpc_url, f"{model}_stream", neighbour_prompt, neighbour_image, max_tokens=40, **GREEDY
    ).result()
    mark = long_trace.mark()
    doomed = GrpcStream(long_triton.grpc_url, f"{model}_stream", prompt, image, max_tokens=LONG, **GREEDY)
    doomed.first_text()
    neighbour = GrpcStream(
        long_triton.grpc_url, f"{model}_stream", neighbour_prompt, neighbour_image, max_tokens=40, **GREEDY
    )
    neighbour.first_text()
    doomed.cancel()
    assert neighbour.result() == expected
    ended = {row["end"]: row for row in long_trace.wait(mark, 2)}
    assert set(ended) == {"cancelled", "length"} and ended["length"]["tokens"] == 40
    cancelled = ended["cancelled"]
    assert sum(1 for at in cancelled["token_times"] if at > cancelled["cancel_seen"]["time"]) <= 1
    assert cancelled["token_times"][0] < ended["length"]["token_times"][0]  # it ran beside the neighbour


@pytest.fixture(scope="module")
def small_queue_triton(tiny_models_dir):
    """llava with one running row and two waiting places, so that the queue fills; its rows
    write past their end-of-sequence, so one asked for LONG tokens runs until cancelled."""
    env = {
        "LLAVA_MAX_RUNNING": "1",
        "LLAVA_MAX_WAITING": "2",
        "LLAVA_IGNORE_EOS": "true",
        "MAX_TOKENS_CAP": str(LONG),
        "KV_CACHE_TOKENS": str(LONG + 1024),
    }
    server = start_triton(tiny_models_dir, "tritonserver-small-queue.log", models=["llava", "llava_stream"], env=env)
    yield server
    server.stop()


def test_a_full_queue_answers_503_at_once_and_the_server_stays_healthy(small_queue_triton, png):
    """The running row cannot end by itself and both waiting places are taken: one more request
    is refused as "at capacity" (not after waiting for a place), and once the running row is
    cancelled the queued ones are answered and the server is healthy."""
    server = small_queue_triton
    running = GrpcStream(server.grpc_url, "llava_stream", PROMPTS[0], png, max_tokens=LONG, **GREEDY)
    running.first_text()
    queued = [GrpcStream(server.grpc_url, "llava_stream", PROMPTS[i], png, max_tokens=4, **GREEDY) for i in (1, 2)]
    deadline = time.monotonic() + HANG_S
    while metric(server.metrics_url, "vlm_scheduler_waiting_requests", model="llava") < 2:
        assert time.monotonic() < deadline, "the two requests never queued"
    client = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("llava", inputs(httpclient, PROMPTS[3], png, max_tokens=4, **GREEDY))
    assert refused.value.status() == "503", (refused.value.status(), refused.value.message())
    assert "at capacity" in refused.value.message() and "retry later" in refused.value.message()
    running.cancel()
    assert all(stream.result() for stream in queued)
    assert client.is_server_ready() and client.is_model_ready("llava_stream")
    assert text_of(client.infer("llava", inputs(httpclient, PROMPTS[0], png, max_tokens=4, **GREEDY)))


def test_kserve_infer_answers_a_short_request_while_a_long_one_sent_first_runs(long_triton, long_trace):
    """The face forwards every request at once and answers each when its own answer is done: a
    short infer sent while a long one (which cannot end by itself) runs is answered."""
    prompt, image, _ = _request(2)
    mark = long_trace.mark()
    client = grpcclient.InferenceServerClient(long_triton.grpc_url)
    call = client.async_infer(
        "llava", inputs(grpcclient, prompt, image, max_tokens=LONG, **GREEDY), lambda result, error: None
    )
    deadline = time.monotonic() + HANG_S
    while metric(long_triton.metrics_url, "vlm_scheduler_running_rows", model="llava") < 1:
        assert time.monotonic() < deadline, "the long infer never ran"
    assert infer_http(long_triton.http_url, "llava", "What is this?", image, max_tokens=2, **GREEDY)
    call.cancel()
    client.close()
    short_row, long_row = long_trace.wait(mark, 2)
    assert (short_row["end"], short_row["tokens"], long_row["end"]) == ("length", 2, "cancelled")
