"""The in-flight scheduler in-process (the local backend's path; Triton runs the same code)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import image_bytes
from vlm_engine.chat import single_turn
from vlm_engine.engine import VLMEngine
from vlm_engine.errors import EngineError, Overloaded, ShuttingDown
from vlm_engine.params import GenerationParams
from vlm_engine.sampling import choose_tokens
from vlm_engine.scheduler import CANCEL_CHECK_STEPS, MAX_HELD_STEPS, Event, Metrics
from vlm_engine.settings import resolve_settings
from vlm_engine.tiny.samples import PROMPTS

MODELS = ["moondream2", "kosmos2", "llava", "qwen3-vl"]
LONG = 100_000  # tokens a never-ending row asks for: no machine writes them in a test's time
NEVER_ENDING = {"IGNORE_EOS": "true", "MAX_TOKENS_CAP": str(LONG), "KV_CACHE_TOKENS": str(LONG + 1024)}
SIZES = [(64, 64), (224, 224), (300, 120), (97, 211), (500, 400), (32, 48), (160, 160), (640, 360)]


class Recorder(Metrics):
    def __init__(self) -> None:
        self.calls: dict[str, list] = {"queue": [], "waited": [], "step": [], "tokens": []}

    def queue(self, running, waiting):
        self.calls["queue"].append((running, waiting))

    def waited(self, seconds):
        self.calls["waited"].append(seconds)

    def step(self, kind, seconds, rows):
        self.calls["step"].append((kind, rows))

    def tokens(self, count):
        self.calls["tokens"].append(count)


def make_engine(models_dir, model: str, metrics: Metrics | None = None, **env) -> VLMEngine:
    """An engine on a tiny checkpoint; eager unless ``COMPILE_STEP`` says (compiling takes
    seconds per engine; ``test_compiled_step`` runs the compiled step), its inputs made on the
    request's thread unless ``PREPARE_WORKERS`` says (``test_input_workers``, ``test_engine``)."""
    defaults = {"COMPILE_STEP": "false", "PREPARE_WORKERS": "0"}
    settings = resolve_settings(model, env={"VLM_MODELS_DIR": str(models_dir), **defaults, **env})
    return VLMEngine(settings, metrics=metrics)


@pytest.fixture(scope="module")
def engines(tiny_models_dir):
    loaded = {name: make_engine(tiny_models_dir, name) for name in MODELS}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.fixture(scope="module")
def never_ending(tiny_models_dir):
    """Engines whose rows write past their end-of-sequence: a row asked for ``LONG`` tokens runs
    until it is cancelled, so a test that needs it still running never races the machine."""
    loaded = {name: make_engine(tiny_models_dir, name, **NEVER_ENDING) for name in ("llava", "kosmos2", "qwen3-vl")}
    yield loaded
    for engine in loaded.values():
        engine.close()


def test_an_answer_not_streamed_gets_text_every_max_held_steps_alone(tiny_models_dir):
    """A request whose edge sends only the answer (``streamed=False``: the KServe face, whose
    forwarder checks its client on each response) gets a text event once per MAX_HELD_STEPS
    steps, not at every step even with no gap set; a streamed one beside it gets every token."""
    engine = make_engine(tiny_models_dir, "llava", STREAM_GAP_MS="0", **NEVER_ENDING)
    tokens = 4 * MAX_HELD_STEPS + 1
    try:
        quiet = prepare(engine, 0, tokens)
        quiet.streamed = False
        rows = [Request(engine, quiet), Request(engine, prepare(engine, 1, tokens))]
        results = [row.result() for row in rows]
    finally:
        engine.close()
    assert [r.output_tokens for r in results] == [tokens, tokens]
    quiet_texts = [event_text for event_text in rows[0].texts[:-1] if event_text]
    # the first token at once, then one per MAX_HELD_STEPS tokens; the last ones come with the result
    assert len(quiet_texts) == 1 + (tokens - 1) // MAX_HELD_STEPS - 1, rows[0].texts
    assert len([t for t in rows[1].texts if t]) > 4 * 4


class Request:
    """One submitted request and its events, in arrival order."""

    def __init__(self, engine: VLMEngine, prepared, order: list | None = None, name: str = ""):
        self.events: queue.Queue[Event] = queue.Queue()
        self.texts: list[str] = []
        self.final: Event | None = None
        self.order, self.name = order, name
        engine.submit(prepared, self._emit)

    def _emit(self, event: Event) -> None:
        if event.final and self.order is not None:
            self.order.append(self.name)
        self.events.put(event)

    def read(self) -> Event:
        event = self.events.get(timeout=60)
        self.texts.append(event.text)
        if event.final:
            self.final = event
        return event

    def first_text(self) -> None:
        while self.final is None and not "".join(self.texts):
            self.read()

    def result(self):
        while self.final is None:
            self.read()
        if self.final.error is not None:
            raise self.final.error
        assert "".join(self.texts) == self.final.result.text, "streamed chunks must join to the answer"
        return self.final.result


def prepare(engine: VLMEngine, i: int, max_tokens: int, temperature: float = 0.0, **kwargs):
    image = image_bytes(SIZES[i], "PNG" if i % 2 else "JPEG", (30 * i, 90, 200 - 20 * i))
    return engine.prepare(single_turn(PROMPTS[i], image), max_tokens, temperature, **kwargs)


@pytest.mark.parametrize("model", MODELS)
def test_rows_joining_at_different_steps_get_their_solo_answers(engines, model):
    engine = engines[model]
    alone = [engine.generate([prepare(engine, i, 10 + 4 * i)])[0].text for i in range(8)]
    assert len(set(alone)) == 8
    largest = engine.scheduler.stats.largest_batch
    requests, sampled = [], []
    for i in range(8):
        requests.append(Request(engine, prepare(engine, i, 10 + 4 * i)))
        if i % 3 == 0:  # sampled rows share the same steps
            sampled.append(Request(engine, prepare(engine, i, 16, temperature=1.2, top_p=0.9)))
        requests[-1].first_text()  # the next one joins a batch that is already running
    assert [r.result().text for r in requests] == alone
    for request in sampled:
        request.result()
    assert engine.scheduler.stats.largest_batch > max(largest, 1)


def endless(engine: VLMEngine, i: int, order: list | None = None, name: str = "") -> tuple[Request, threading.Event]:
    """A row of a ``NEVER_ENDING`` engine that runs until the returned event is set."""
    gone = threading.Event()
    return Request(engine, prepare(engine, i, LONG, cancelled=gone.is_set), order, name), gone


def _long_prompt(engine: VLMEngine, max_tokens: int) -> int:
    for i in range(8):
        if engine.generate([prepare(engine, i, max_tokens)])[0].finish_reason == "length":
            return i
    raise AssertionError("no sample runs to its token limit")


def _finishing_order(engine: VLMEngine, long_tokens: int) -> list[str]:
    """A short request sent once a long answer has begun: which finishes first."""
    order: list[str] = []
    long = Request(engine, prepare(engine, _long_prompt(engine, long_tokens), long_tokens), order, "long")
    long.first_text()
    short = Request(engine, prepare(engine, 3, 3), order, "short")
    short.result(), long.result()
    return order


@pytest.mark.parametrize("model", ["llava", "kosmos2", "qwen3-vl"])
def test_a_short_request_sent_during_a_long_one_finishes_first(never_ending, model):
    """The long row cannot end by itself: the short one is answered while it runs."""
    engine, order = never_ending[model], []
    long, gone = endless(engine, 0, order, "long")
    long.first_text()
    assert Request(engine, prepare(engine, 3, 3), order, "short").result().output_tokens == 3
    gone.set()
    assert long.result().finish_reason == "cancelled"
    assert order == ["short", "long"]


def test_static_policy_makes_the_short_request_wait(tiny_models_dir):
    """The comparison setting: a batch is admitted only when the previous one is done."""
    engine = make_engine(tiny_models_dir, "llava", SCHEDULER="static")
    try:
        assert _finishing_order(engine, 120) == ["long", "short"]
    finally:
        engine.close()


def test_a_cancelled_row_stops_while_its_neighbour_goes_on(never_ending):
    engine = never_ending["llava"]
    expected = engine.generate([prepare(engine, 5, 60)])[0].text
    doomed, gone = endless(engine, 0)
    doomed.first_text()
    neighbour = Request(engine, prepare(engine, 5, 60))
    neighbour.first_text()
    gone.set()
    cancelled = doomed.result()
    assert cancelled.finish_reason == "cancelled" and cancelled.output_tokens < LONG
    assert neighbour.result().text == expected


@contextmanager
def full_engine(tiny_models_dir, **env: str) -> Iterator[tuple[VLMEngine, Callable[[], None]]]:
    """An engine with MAX_RUNNING=1 and MAX_WAITING=1, both taken (the running row cannot end
    by itself): the next request is one too many. Yields it and a function that lets the two end."""
    engine = make_engine(tiny_models_dir, "llava", MAX_RUNNING="1", MAX_WAITING="1", **NEVER_ENDING, **env)
    try:
        running, gone = endless(engine, 1)
        running.first_text()  # admitted: the running batch is full
        waiting = Request(engine, prepare(engine, 2, 4))
        finished: list[bool] = []

        def finish() -> None:
            if not finished:
                gone.set()
                running.result(), waiting.result()
                finished.append(True)

        yield engine, finish
        finish()
    finally:
        engine.close()


def test_a_full_queue_is_refused_at_once(tiny_models_dir):
    with full_engine(tiny_models_dir) as (engine, finish):
        with pytest.raises(Overloaded, match=r"at capacity: 2 requests in flight \(MAX_RUNNING=1 \+ MAX_WAITING=1\)"):
            Request(engine, prepare(engine, 3, 4))
        assert engine.scheduler.stats.rejected == 1
        finish()
        assert Request(engine, prepare(engine, 3, 4)).result().output_tokens >= 1  # room again


def test_when_full_the_refusal_comes_before_the_image_is_decoded(tiny_models_dir):
    with full_engine(tiny_models_dir) as (engine, _):
        with pytest.raises(Overloaded):  # not InvalidImage: nothing was decoded
            engine.prepare(single_turn("What is this?", b"not an image at all"), 4)


def test_a_request_that_waits_too_long_gets_a_clear_503(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", MAX_RUNNING="1", MAX_QUEUE_WAIT_S="0.5", **NEVER_ENDING)
    try:
        running, gone = endless(engine, 1)
        running.first_text()
        started = time.monotonic()
        late = Request(engine, prepare(engine, 2, 4))
        with pytest.raises(Overloaded, match=r"waited \d+ s in the queue \(MAX_QUEUE_WAIT_S=0.5\)") as caught:
            late.result()
        assert caught.value.status == 503 and time.monotonic() - started >= 0.5
        gone.set()
        assert running.result().finish_reason == "cancelled"  # the running row ran on, undisturbed
    finally:
        engine.close()


def test_a_request_whose_prefill_fails_fails_alone(engines):
    engine = engines["llava"]
    good = [prepare(engine, i, 8) for i in (0, 1, 2)]
    expected = [engine.generate([p])[0].text for p in (prepare(engine, i, 8) for i in (0, 1, 2))]
    # a prompt no test sent before (a cached one would not run the vision tower at all)
    bad = engine.prepare(single_turn("A question no test asked before.", image_bytes(SIZES[4])), 8, 0.0)
    bad.inputs["pixel_values"] = torch.zeros(1, 3, 9, 9)  # not what the vision tower takes
    requests = [Request(engine, p) for p in (good[0], bad, good[1], good[2])]
    with pytest.raises(EngineError):
        requests[1].result()
    assert [r.result().text for r in (requests[0], requests[2], requests[3])] == expected


def test_a_failed_decode_step_fails_its_rows_and_the_loop_goes_on(tiny_models_dir, monkeypatch):
    engine = make_engine(tiny_models_dir, "llava", **NEVER_ENDING)
    try:
        step = engine.adapter.step
        failed: list[bool] = []

        def flaky(decodes, chunks):
            if len(decodes) >= 2 and not failed:  # the first step of both rows (the first cannot end)
                failed.append(True)
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return step(decodes, chunks)

        monkeypatch.setattr(engine.adapter, "step", flaky)
        victims = [endless(engine, 0)[0], Request(engine, prepare(engine, 1, 30))]
        for victim in victims:
            with pytest.raises(EngineError, match="illegal memory access"):
                victim.result()
        assert Request(engine, prepare(engine, 2, 6)).result().output_tokens >= 1
    finally:
        engine.close()


def test_close_drains_or_fails_what_is_in_flight(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava")
    drained = [Request(engine, prepare(engine, i, 20)) for i in (0, 1)]
    engine.close(drain=True)
    assert all(r.result().output_tokens >= 1 for r in drained)
    with pytest.raises(ShuttingDown):
        engine.submit(prepare(engine, 0, 4), lambda event: None)

    engine = make_engine(tiny_models_dir, "llava", **NEVER_ENDING)
    doomed, _ = endless(engine, 0)
    doomed.first_text()
    engine.close(drain=False)
    with pytest.raises(ShuttingDown, match="shut down before this request finished"):
        doomed.result()


def test_the_scheduler_reports_its_metrics(tiny_models_dir):
    recorder = Recorder()
    engine = make_engine(tiny_models_dir, "qwen3-vl", recorder)
    try:
        results = engine.generate([prepare(engine, i, 6) for i in range(3)])
    finally:
        engine.close()
    kinds = {kind for kind, _ in recorder.calls["step"]}
    assert kinds == {"prefill", "decode"}
    assert sum(recorder.calls["tokens"]) >= sum(r.output_tokens for r in results)
    assert recorder.calls["waited"] and all(s >= 0 for s in recorder.calls["waited"])
    assert recorder.calls["queue"][-1] == (0, 0)


def test_greedy_rows_ignore_sampled_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy, hot = GenerationParams(5, 0.0, 1.0), GenerationParams(5, 1.5, 0.95)
    chosen = choose_tokens(logits, [greedy, hot, greedy, GenerationParams(5, 1.0, 1e-9)])
    assert chosen[0] == int(logits[0].argmax()) and chosen[2] == int(logits[2].argmax())
    assert chosen[3] == int(logits[3].argmax()), "a tiny top_p keeps only the most likely token"
    picks = {choose_tokens(logits[1:2], [hot])[0] for _ in range(30)}
    assert len(picks) > 1, "a sampled row varies"


@pytest.mark.parametrize("temperature", [1e-300, 1.1754943508222875e-38, 1e-45])
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1.0])
def test_extreme_but_valid_values_pick_the_likeliest_token(temperature, top_p):
    """Found by schemathesis: a temperature that is 0 or overflows in float32, a top_p that is 0
    in float32; both are in range, so they must sample (as greedy), not fail on NaN."""
    torch.manual_seed(1)
    logits = torch.randn(3, 50) * 30
    chosen = choose_tokens(logits, [GenerationParams(5, temperature, top_p)] * 3)
    assert chosen == logits.argmax(dim=-1).tolist()


def test_stream_interval_sends_fewer_chunks_with_the_same_text(tiny_models_dir):
    every, grouped = (make_engine(tiny_models_dir, "llava", STREAM_INTERVAL=n, STREAM_GAP_MS="0") for n in ("1", "4"))
    try:
        chunks = {}
        for name, engine in (("every", every), ("grouped", grouped)):
            request = Request(engine, prepare(engine, 1, 24))
            request.result()
            chunks[name] = [t for t in request.texts if t]
        assert "".join(chunks["every"]) == "".join(chunks["grouped"])
        assert len(chunks["grouped"]) < len(chunks["every"])
        assert chunks["grouped"][0] == chunks["every"][0], "the first text is sent at once"
    finally:
        every.close(), grouped.close()


def test_stream_gap_limits_how_often_a_row_sends_text(tiny_models_dir):
    """STREAM_GAP_MS: a started row's text waits until that long after its last text; the
    first text still goes at once and nothing is lost (the rest comes with the result)."""
    every = make_engine(tiny_models_dir, "llava", STREAM_GAP_MS="0")
    gapped = make_engine(tiny_models_dir, "llava", STREAM_GAP_MS="1000")  # longer than the whole answer, here
    try:
        chunks, seconds = {}, {}
        for name, engine in (("every", every), ("gapped", gapped)):
            started = time.monotonic()
            request = Request(engine, prepare(engine, 1, 24))
            request.result()
            seconds[name] = time.monotonic() - started
            chunks[name] = [t for t in request.texts if t]
        assert "".join(chunks["every"]) == "".join(chunks["gapped"])
        assert len(chunks["every"]) > 2
        # the first text at once, then at most one per second, the rest with the result: 2 pieces
        # when the answer takes under a second (it does here), a piece more per second on a slower machine
        assert len(chunks["gapped"]) <= 2 + int(seconds["gapped"]), (chunks["gapped"], seconds)
        assert chunks["gapped"][0] == chunks["every"][0]
    finally:
        every.close(), gapped.close()


def test_a_client_that_leaves_is_dropped_within_a_bound_of_steps_even_when_asking_is_slow(tiny_models_dir, tmp_path):
    """The loop asks for a cancellation sweep every CANCEL_CHECK_STEPS turns and waits for a late
    one, so a client that left is seen within 2 * CANCEL_CHECK_STEPS + 1 steps, however slow the
    question (here 20 ms a row, many steps' worth) and however fast the steps."""
    trace = tmp_path / "rows.jsonl"
    engine = make_engine(tiny_models_dir, "llava", ROW_TRACE_FILE=str(trace), **NEVER_ENDING)
    try:
        gone = threading.Event()
        left_at: list[float] = []

        def cancelled() -> bool:
            time.sleep(0.02)
            return gone.is_set()

        row = Request(engine, prepare(engine, 0, LONG, cancelled=cancelled))
        row.first_text()
        while len("".join(row.texts)) < 40:  # some steps in: sweeps have been asked for and waited on
            row.read()
        left_at.append(time.monotonic())
        gone.set()
        assert row.result().finish_reason == "cancelled"
    finally:
        engine.close()
    record = [json.loads(line) for line in trace.read_text().splitlines()][-1]  # after the warm-up's
    after = sum(1 for at in record["token_times"] if at > left_at[0])
    assert record["end"] == "cancelled" and after <= 2 * CANCEL_CHECK_STEPS + 1, (after, record["tokens"])


def test_held_text_goes_out_at_least_every_max_held_steps(tiny_models_dir):
    """With a gap longer than the whole answer, a streamed row still sends text every
    MAX_HELD_STEPS steps (what an edge that checks its client on each response relies on)."""
    engine = make_engine(tiny_models_dir, "llava", STREAM_GAP_MS="1000", **NEVER_ENDING)
    try:
        row = Request(engine, prepare(engine, 0, 4 * MAX_HELD_STEPS + 1))
        result = row.result()
    finally:
        engine.close()
    texts = [text for text in row.texts if text]
    assert result.output_tokens == 4 * MAX_HELD_STEPS + 1
    assert len(texts) >= 4, f"{len(texts)} pieces of text for {result.output_tokens} tokens"
