"""A client that leaves frees its row soon, through every way in (issue 19, made independent of
the machine's speed in issue 24): KServe infer on the face over gRPC, generate_stream, gRPC
streaming, the OpenAI route (streamed and not) and /api/chat.

Nothing here races the machine:
- Each request asks for ``LONG`` tokens (IGNORE_EOS; ``long_triton`` in conftest.py), far more
  than any machine writes in the test's time, so an answer cannot end before its client leaves.
- The client leaves on an event, never on a timer: streams after their first text; plain
  requests once the engine's metrics, read as current, show the row running.
- What happened is read from the engine's own trace (``ROW_TRACE_FILE``: each token's time on
  the host's monotonic clock, which this process shares), not from a gauge: the test counts the
  tokens the row generated after the moment its client left. The hops from the client to the
  engine that keep pace with the steps (the scheduler's cancellation sweeps, the face's
  heartbeats) are bounded in steps; the ones that are events between processes (a closed
  socket, a gRPC cancel) take wall time, not steps, so tokens in the first ``EVENT_S`` after
  the client left are not counted against the bound (here they took under 0.02 s: up to 16
  tokens; a faster machine writes more tokens in the same time, a busy one may pause a hop).
"""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.conftest import ARTIFACTS, HANG_S, LONG, image_bytes
from tests.fastapi_app.conftest import ApiProcess, api_env
from tests.integration.helpers import GrpcStream, inputs, metric
from vlm_engine.scheduler import CANCEL_CHECK_STEPS, MAX_HELD_STEPS

MODEL = "llava"
RUNNING = "vlm_scheduler_running_rows"
IMAGE = image_bytes((64, 64), "PNG", (90, 30, 200))
# Steps a row may run after its client left, beyond the events between processes (a closed
# socket, a gRPC cancel: EVENT_S of wall time, generous): the scheduler sees a client's cancel
# within 2 * CANCEL_CHECK_STEPS + 1 steps of Triton's request being cancelled; the face (KServe
# infer) checks its client whenever a heartbeat comes, at least every MAX_HELD_STEPS steps.
EVENT_S = 2.0
SWEEP_STEPS = 2 * CANCEL_CHECK_STEPS + 1
BOUND = {"kserve_infer": SWEEP_STEPS + MAX_HELD_STEPS}
DEFAULT_BOUND = SWEEP_STEPS


@pytest.fixture(scope="module")
def long_api(long_triton, tmp_path_factory):
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=long_triton.grpc_url, MAX_TOKENS_CAP=str(LONG), SERVED_MODELS=MODEL)
    server = ApiProcess("api-cancel", env).start()
    yield server
    server.stop()


def wait_until_running(triton) -> None:
    """Until the engine's metrics, read as current, show the row running. The row cannot end
    before its client leaves (``LONG``), so this waits for as long as the metrics take."""
    deadline = time.monotonic() + HANG_S
    while metric(triton.metrics_url, RUNNING, model=MODEL) < 1:
        assert time.monotonic() < deadline, "the request never ran"


# -- the ways in: each returns once its client has left


def kserve_infer(triton, _api) -> None:
    """KServe infer over gRPC, cancelled by the client (Triton's HTTP frontend cannot cancel a
    request: only its gRPC frontend and C API can, so an HTTP infer whose client leaves runs on)."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    call = client.async_infer(
        MODEL, inputs(grpcclient, "Describe this.", IMAGE, max_tokens=LONG), lambda result, error: None
    )
    wait_until_running(triton)
    call.cancel()
    client.close()


def generate_stream(triton, _api) -> None:
    body = {"prompt": "Describe this.", "image": list(IMAGE), "max_tokens": LONG}
    url = f"http://{triton.http_url}/v2/models/{MODEL}_stream/generate_stream"
    with requests.post(url, json=body, stream=True, timeout=HANG_S) as reply:
        next(line for line in reply.iter_lines() if line.startswith(b"data:"))
    # leaving the block closes the connection


def grpc_stream(triton, _api) -> None:
    stream = GrpcStream(triton.grpc_url, f"{MODEL}_stream", "Describe this.", IMAGE, max_tokens=LONG)
    stream.first_text()
    stream.cancel()


def _openai_body(stream: bool) -> dict:
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    content = [{"type": "text", "text": "Describe this."}, {"type": "image_url", "image_url": {"url": url}}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": LONG, "stream": stream}


def openai_streamed(_triton, api) -> None:
    with httpx.stream("POST", api.url + "/v1/chat/completions", json=_openai_body(True), timeout=HANG_S) as reply:
        next(line for line in reply.iter_lines() if '"content":' in line and '"content": ""' not in line)


def openai_plain(triton, api) -> None:
    """A plain answer's client sends its request on a socket of its own and closes it once the
    row runs (no client timeout involved)."""
    body = json.dumps(_openai_body(False)).encode()
    host, port = api.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(head + body)
        wait_until_running(triton)
        connection.shutdown(socket.SHUT_RDWR)


def api_chat(_triton, api) -> None:
    body = {"model": MODEL, "prompt": "Describe this.", "image": base64.b64encode(IMAGE).decode()}
    body |= {"max_tokens": LONG, "stream": True}
    with httpx.stream("POST", api.url + "/api/chat", json=body, timeout=HANG_S) as reply:
        next(line for line in reply.iter_lines() if '"chunk"' in line)


@pytest.mark.parametrize(
    "leave",
    [kserve_infer, generate_stream, grpc_stream, openai_streamed, openai_plain, api_chat],
    ids=lambda f: f.__name__,
)
def test_a_client_that_leaves_frees_its_row_within_a_bound_of_steps(long_triton, long_api, long_trace, leave):
    seen = long_trace.mark()
    assert metric(long_triton.metrics_url, RUNNING, model=MODEL) == 0, "a row of an earlier test still runs"
    leave(long_triton, long_api)
    left_at = time.monotonic()

    [row] = long_trace.wait(seen)
    way, bound = leave.__name__, BOUND.get(leave.__name__, DEFAULT_BOUND)
    after_leave = sum(1 for at in row["token_times"] if at > left_at)
    after_events = sum(1 for at in row["token_times"] if at > left_at + EVENT_S)
    figures = {
        "way": way,
        "end": row["end"],
        "tokens": row["tokens"],
        "tokens_after_leave": after_leave,
        "tokens_after_events": after_events,
        "bound": bound,
        "freed_after_s": round(row["ended"] - left_at, 3),
    }
    with (ARTIFACTS / "cancellation.jsonl").open("a") as record:
        record.write(json.dumps(figures) + "\n")
    print(json.dumps(figures))
    assert row["end"] == "cancelled", f"{way}: the row ended {row['end']!r}, not cancelled: {figures}"
    assert row["tokens"] < LONG
    seen_at = row["cancel_seen"]
    assert seen_at is not None, f"{way}: the engine never saw the client leave"
    after_seen = sum(1 for at in row["token_times"] if at > seen_at["time"])
    assert after_seen <= 1, f"{way}: {after_seen} tokens after the engine saw the cancel (one step may be running)"
    assert after_events <= bound, (
        f"{way}: {after_events} tokens more than {EVENT_S:g} s after the client left, more than {bound}: {figures}"
    )


def test_the_trace_records_a_row_that_ran_to_its_end(long_triton, long_trace):
    """The trace the test above reads is the engine's: a row that finishes has all its tokens timed."""
    seen = long_trace.mark()
    stream = GrpcStream(long_triton.grpc_url, f"{MODEL}_stream", "Describe this.", IMAGE, max_tokens=12)
    stream.result()
    [row] = long_trace.wait(seen)
    assert (row["end"], row["tokens"], row["cancel_seen"]) == ("length", 12, None)
    assert len(row["token_times"]) == 12 and row["token_times"] == sorted(row["token_times"])
    assert row["submitted"] <= row["token_times"][0] <= row["ended"]
