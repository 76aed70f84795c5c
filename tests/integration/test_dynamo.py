"""Triton's models through NVIDIA Dynamo (issue 20): Dynamo's own frontend (KServe gRPC) and two
``vlm_dynamo.worker`` processes registered through a file store, in front of a real tritonserver.
The unmodified ``tritonclient.grpc`` must get Triton's answers, streams and errors through it;
two workers share the requests; a killed worker loses only the requests it was running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ARTIFACTS, HANG_S, LONG, ROOT, free_ports
from tests.integration.helpers import (
    GREEDY,
    MODELS,
    GrpcStream,
    chat_text,
    infer_grpc,
    inputs,
    kill_under_load,
    llm_decoupled_grpc,
    metric,
    stream_grpc,
)
from vlm_stack.config import QUIET_DYNAMO_LOG
from vlm_stack.local import INHIBIT_S

REPOSITORY = sorted(p.parent.name for p in (ROOT / "triton_models").glob("*/config.pbtxt"))


def low_free_ports(count: int) -> list[int]:
    """Free ports below 32768: Dynamo 1.6.1 reads ``DYN_SYSTEM_PORT`` as a signed 16-bit number."""
    found: list[int] = []
    while len(found) < count:
        found += [port for port in free_ports(count) if port < 32768][: count - len(found)]
    return found


class Process:
    """One Dynamo process of the test, its output in artifacts/."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]):
        self.name, self.command, self.env = name, command, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        log = open(ARTIFACTS / f"dynamo-{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Dynamo:
    """Dynamo's frontend and two workers forwarding to one tritonserver."""

    def __init__(self, triton, kv: Path, workers: int = 2, models: list[str] | None = None):
        self.triton = triton
        self.models = set(models or REPOSITORY)  # what it lists once registered
        self.grpc_port, self.metrics_port = free_ports(2)
        self.worker_ports = low_free_ports(workers)
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.env = {
            **os.environ,
            "DYN_DISCOVERY_BACKEND": "file",
            "DYN_FILE_KV": str(kv),
            "DYN_NAMESPACE": "vlmtest",
            "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "0",
            "DYN_LOG": QUIET_DYNAMO_LOG,
        }
        self.frontend = Process(
            "frontend",
            [
                sys.executable,
                "-m",
                "dynamo.frontend",
                "--kserve-grpc-server",
                "--http-host=127.0.0.1",
                f"--http-port={self.grpc_port}",
                f"--grpc-metrics-port={self.metrics_port}",
                "--discovery-backend=file",
                "--namespace=vlmtest",
            ],
            {**self.env, "DYN_RUNTIME_INHIBITED_DURATION_SECS": INHIBIT_S},  # as the launcher sets it
        )
        self.workers = [self.worker(i) for i in range(workers)]

    def worker(self, index: int) -> Process:
        env = {**self.env, "DYN_SYSTEM_PORT": str(self.worker_ports[index])}
        command = [sys.executable, "-m", "vlm_dynamo.worker", f"--triton={self.triton.grpc_url}"]
        return Process(f"worker{index}", command, env)

    def listed(self) -> set[str]:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/v1/models"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return {m["id"] for m in json.load(reply)["data"]}
        except OSError:
            return set()

    def served(self, index: int) -> float:
        """Requests worker ``index`` has taken (its own Dynamo metrics)."""
        return metric(f"127.0.0.1:{self.worker_ports[index]}", "dynamo_component_requests_total")

    def wait_registered(self, workers: list[int], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process in [self.frontend, *(self.workers[i] for i in workers)]:
                if process.proc is None or process.proc.poll() is not None:
                    log = (ARTIFACTS / f"dynamo-{process.name}.log").read_text(errors="replace")[-1500:]
                    raise AssertionError(f"Dynamo's {process.name} exited:\n{log}")
            if self.models <= self.listed() and all(self._up(i) for i in workers):
                return
            time.sleep(0.5)
        raise AssertionError(f"Dynamo lists {sorted(self.listed())}; see artifacts/dynamo-*.log")

    def _up(self, index: int) -> bool:
        try:
            return self.served(index) >= 0
        except OSError:
            return False


@pytest.fixture(scope="module")
def dynamo(triton, tmp_path_factory):
    stack = Dynamo(triton, tmp_path_factory.mktemp("dynamo-kv"))
    stack.frontend.start()
    for worker in stack.workers:
        worker.start()
    try:
        stack.wait_registered([0, 1])
        yield stack
    finally:
        for process in [*stack.workers, stack.frontend]:
            process.stop()


@pytest.mark.parametrize("model", MODELS)
def test_each_model_answers_through_dynamo_as_triton_does(dynamo, triton, model, jpeg):
    direct = infer_grpc(triton.grpc_url, model, "What is this?", jpeg, max_tokens=12, **GREEDY)
    assert infer_grpc(dynamo.url, model, "What is this?", jpeg, max_tokens=12, **GREEDY) == direct
    other = infer_grpc(dynamo.url, model, "What is this?", jpeg, max_tokens=3, **GREEDY)
    assert other != direct, "max_tokens must reach the model through Dynamo"


@pytest.mark.parametrize("model", MODELS)
def test_streams_through_dynamo_join_to_the_answer(dynamo, triton, model, jpeg):
    expected = infer_grpc(triton.grpc_url, model, "What is this?", jpeg, max_tokens=12, **GREEDY)
    texts = stream_grpc(dynamo.url, f"{model}_stream", "What is this?", jpeg, max_tokens=12, **GREEDY)
    assert len([t for t in texts if t]) >= 2, f"one response per piece of text, not one lump: {texts}"
    assert "".join(texts) == expected


def test_llm_decoupled_streams_through_dynamo_with_its_parameters(dynamo, triton):
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    direct = llm_decoupled_grpc(triton.grpc_url, messages, max_tokens=10, temperature=0.0)
    through = llm_decoupled_grpc(dynamo.url, messages, max_tokens=10, temperature=0.0)
    assert chat_text(through) == chat_text(direct) != ""
    assert through[-1] == {"type": "complete"} and len(through) >= 3, through
    shorter = llm_decoupled_grpc(dynamo.url, messages, max_tokens=2, temperature=0.0)
    assert len(chat_text(shorter)) < len(chat_text(through)), "request parameters must reach Triton through Dynamo"


def test_metadata_and_config_are_tritons(dynamo, triton):
    direct, through = grpcclient.InferenceServerClient(triton.grpc_url), grpcclient.InferenceServerClient(dynamo.url)
    for model in ("llava", "qwen3-vl_stream", "llm_decoupled"):
        ours, theirs = direct.get_model_metadata(model), through.get_model_metadata(model)
        assert [(i.name, i.datatype) for i in theirs.inputs] == [(i.name, i.datatype) for i in ours.inputs]
        assert [(o.name, o.datatype) for o in theirs.outputs] == [(o.name, o.datatype) for o in ours.outputs]
        config = through.get_model_config(model).config
        assert (
            config.model_transaction_policy.decoupled
            == direct.get_model_config(model).config.model_transaction_policy.decoupled
        )
    assert sorted(dynamo.listed()) == REPOSITORY


def test_bad_input_reaches_the_client_with_tritons_message(dynamo, triton, jpeg):
    client = grpcclient.InferenceServerClient(dynamo.url)
    with pytest.raises(InferenceServerException) as bad_image:
        infer_grpc(dynamo.url, "llava", "What?", b"not an image", max_tokens=4)
    with pytest.raises(InferenceServerException) as direct:
        infer_grpc(triton.grpc_url, "llava", "What?", b"not an image", max_tokens=4)
    assert direct.value.message() in bad_image.value.message(), "Triton's own words, not a bare INTERNAL"
    assert "InvalidRequest" in bad_image.value.message(), "marked as the request's fault"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [])
    assert "NOT_FOUND" in str(unknown.value.status())
    stream = GrpcStream(dynamo.url, "llava_stream", "What?", b"not an image", max_tokens=4)
    with pytest.raises(InferenceServerException) as streamed:
        stream.result()
    stream.client.stop_stream()
    assert "invalid_image" in streamed.value.message() and "InvalidRequest" in streamed.value.message()
    # and the next request is fine
    assert infer_grpc(dynamo.url, "llava", "What is this?", jpeg, max_tokens=4, **GREEDY)


def test_two_workers_share_the_requests(dynamo, jpeg):
    before = [dynamo.served(0), dynamo.served(1)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: infer_grpc(dynamo.url, "llava", "Hi?", jpeg, max_tokens=4), range(16)))
    assert all(answers)
    taken = [dynamo.served(i) - before[i] for i in range(2)]
    assert sum(taken) == 16 and min(taken) >= 4, f"requests per worker: {taken}"


@pytest.fixture(scope="module")
def long_dynamo(long_triton, tmp_path_factory):
    """Dynamo (a frontend, one worker) in front of ``long_triton``, whose rows never end on
    their own (``LONG`` tokens, IGNORE_EOS)."""
    stack = Dynamo(long_triton, tmp_path_factory.mktemp("dynamo-long-kv"), workers=1, models=["llava", "llava_stream"])
    stack.frontend.start()
    stack.workers[0].start()
    try:
        stack.wait_registered([0])
        yield stack
    finally:
        for process in [*stack.workers, stack.frontend]:
            process.stop()


def test_a_client_that_leaves_a_dynamo_stream_frees_its_row(long_dynamo, long_trace, jpeg):
    """The row asks for ``LONG`` tokens: only the client leaving ends it (read from the engine's
    trace, as tests/integration/test_cancellation.py does), whatever the machine's speed."""
    seen = long_trace.mark()
    stream = GrpcStream(long_dynamo.url, "llava_stream", "Tell me everything.", jpeg, max_tokens=LONG)
    stream.first_text()
    stream.cancel()
    [row] = long_trace.wait(seen)
    assert row["end"] == "cancelled" and row["tokens"] < LONG, {k: row[k] for k in ("end", "tokens")}


def test_a_client_that_leaves_a_dynamo_infer_frees_its_row(long_dynamo, long_triton, long_trace, jpeg):
    """KServe infer (one response) through Dynamo, cancelled by its gRPC client once the row runs."""
    seen = long_trace.mark()
    client = grpcclient.InferenceServerClient(long_dynamo.url)
    call = client.async_infer(
        "llava", inputs(grpcclient, "Tell me everything.", jpeg, max_tokens=LONG), lambda result, error: None
    )
    deadline = time.monotonic() + HANG_S
    while metric(long_triton.metrics_url, "vlm_scheduler_running_rows", model="llava") < 1:
        assert time.monotonic() < deadline, "the request never ran"
    call.cancel()
    client.close()
    [row] = long_trace.wait(seen)
    assert row["end"] == "cancelled" and row["tokens"] < LONG, {k: row[k] for k in ("end", "tokens")}


def test_a_killed_worker_loses_only_its_requests_and_the_other_goes_on(dynamo, jpeg):
    """Load at concurrency 8; one worker is SIGKILLed. The requests it held fail, and so may
    those sent in the moment before the router saw it fail; none sent 1 s or more after the
    kill may: the frontend leaves an unreachable worker out for 30 s (``INHIBIT_S``), longer
    than discovery keeps its record. With Dynamo's default of 5 s it sent a request to the
    dead worker every 5 s until the record expired. The worker is started again."""
    figures = kill_under_load(dynamo.url, jpeg, dynamo.workers[1].kill)
    (ARTIFACTS / "dynamo-kill.json").write_text(json.dumps(figures))
    assert figures["answered_before"], f"requests failed before the kill: {figures}"
    late = [at for at in figures["sent_after_failed"] if at >= 1.0]
    assert not late, f"requests sent after the router had seen the worker fail did fail: {figures}"
    answered_after = figures["sent_after"] - len(figures["sent_after_failed"])
    assert answered_after >= 8, f"the other worker did not go on answering: {figures}"
    dynamo.workers[1] = dynamo.worker(1).start()
    dynamo.wait_registered([0, 1])
