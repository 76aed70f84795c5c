"""In-flight (continuous) batching over paged KV memory: requests join and leave a running
batch at every step, and a request waits rather than fails when memory is short.

One ``Scheduler`` per loaded model runs one thread, the step loop. Each turn of the loop:

1. **release**: rows that finished, were cancelled or failed leave; their KV references go
   back (pages nobody holds stay cached by hash until the pool needs them);
2. **admit**: waiting requests, oldest first, while there is a row free (``MAX_RUNNING``)
   and the KV pool has pages for the whole prompt plus a small reserve; the cached pages a
   prompt starts with (prefix caching, ``kv.manager``) cost nothing and are not prefilled;
3. **step**: one forward carries a token for every row that has its prompt in and prompt
   chunks of the others. The chunks are bounded by ``PREFILL_BUDGET`` and, while rows are
   decoding, by time: a step with chunks takes about ``step_multiple`` decode steps
   (``Pace`` measures both online: a decode step, and a step's fixed and per-token cost of
   carrying prompts), so running streams keep their pace while a long prompt comes in (a
   chunk may split an image: the adapter slices its encoder output). Short new prompts wait
   up to ``gather_steps`` steps so that several go in one step, when each of them needs the
   vision encoder (its call is a fixed cost, however many images it takes). A row
   whose prompt is complete sends its first text. Each decoding row gets a page when its last one is full; when none is
   free the newest rows are **preempted**: their pages are given back and they go back to
   the front of the queue, to be prefilled again with what they had generated (vLLM's
   recompute preemption; their cached pages usually make that cheap). Nothing they sent is
   sent twice.

Out-of-memory errors (``torch.OutOfMemoryError``) in a prefill or a decode step preempt the
newest rows in the same way and the loop goes on; a request that cannot fit even alone
fails with ``TooLarge``. Any other CUDA error is fatal: ``on_fatal`` is called (Triton's
model exits so that the server reloads it) and the rows in flight fail.

A housekeeping thread asks clients whether they left (``cancelled``), and a reporting thread
flushes metrics about once a second, so neither costs the step loop a round trip. The
housekeeper sweeps every ``CANCEL_CHECK_SECONDS`` and whenever the loop asks, which it does
every ``CANCEL_CHECK_STEPS`` turns; the loop does not ask again before the last sweep is done
(for ``SWEEP_WAIT_MAX_S`` at most: a stuck IPC call must not stall every row). So a row whose
client left is dropped within ``2 * CANCEL_CHECK_STEPS + 1`` steps of the edge noticing it,
however fast the steps are (a timer alone would let a fast machine run hundreds of steps).
Held text goes out at least every ``MAX_HELD_STEPS`` steps, so an edge that checks its own
client whenever a piece arrives checks at least that often too. ``trace_path`` (setting
``ROW_TRACE_FILE``) appends a JSON line per finished row: its times and each token's time.

``policy="static"`` is the old behaviour, kept for comparison: a batch is admitted only when
the previous one has completely finished.

Edges (Triton's ``<model>_stream``, the FastAPI local backend) call ``submit`` with a
callback; it receives ``Event``s on the loop's thread and must not block.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vlm_engine.adapters.base import Adapter, Prepared
from vlm_engine.errors import EngineError, Overloaded, ShuttingDown, TooLarge
from vlm_engine.output import Result, RowDecoder

log = logging.getLogger("vlm_engine.scheduler")
CANCEL_CHECK_SECONDS = 0.05  # how often rows are asked whether their client left, at least
CANCEL_CHECK_STEPS = 8  # ... and every this many turns of the loop
SWEEP_WAIT_MAX_S = 1.0  # the longest the loop waits for a late sweep before going on (and saying so)
MAX_HELD_STEPS = 32  # a streamed row's text is held (STREAM_GAP_MS) for at most this many steps
ALONE_OOM_RETRIES = 2  # a row alone that runs out of memory is tried again this often, then fails
MIN_CHUNK = 16  # prompt tokens a step carries at least, however slow prompt tokens are
Policy = Literal["inflight", "static"]


@dataclass
class Event:
    """For one request: new ``text``; ``result`` on its last event, or ``error`` instead."""

    text: str = ""
    result: Result | None = None
    error: BaseException | None = None
    logprobs: list[dict] | None = None  # of the tokens since the last event (rows that asked)
    index: int = 0  # which of the request's n answers (n > 1)

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


class Metrics:
    """Where the scheduler reports; edges subclass it (Triton metrics, prometheus_client)."""

    def queue(self, running: int, waiting: int) -> None: ...

    def waited(self, seconds: float) -> None: ...

    def step(self, kind: str, seconds: float, rows: int) -> None: ...

    def tokens(self, count: int) -> None: ...

    def prefix_cache(self, queried: int, hit: int) -> None:
        """A row admitted: ``queried`` prompt tokens looked up, ``hit`` of them found cached."""

    def reported(self) -> None:
        """After each report: a reader that sees this count advance twice knows the others current."""


@dataclass
class Stats:
    """Counters since start, for tests and benchmarks."""

    admitted: int = 0
    prefills: int = 0  # prefill forwards (each over one chunk of one or more rows)
    prefill_tokens: int = 0
    decode_steps: int = 0
    tokens: int = 0
    largest_batch: int = 0
    rejected: int = 0
    preempted: int = 0  # rows sent back to the queue for lack of KV pages
    out_of_memory: int = 0  # OutOfMemoryErrors recovered from
    gathered: int = 0  # steps new prompts waited for others to go with them (``gather_steps``), summed over rows
    turns: list[tuple[int, int]] = field(default_factory=list)  # recent (prefill tokens, decode rows) per turn


@dataclass
class Pace:
    """Online estimates for the chunk budget (moving averages): a decode-only step's time, and
    what prompt tokens add to a step, fitted as a fixed part (a step carrying prompts calls the
    vision encoder, embeds outside the graph, samples every row) plus a part per token.
    Counting the fixed part per token would make a step with few prompt tokens look expensive
    per token, shrink the next budget, and so on: prompts would trickle in a few tokens a step."""

    decode_s: float = 0.0
    fixed_s: float = 0.0  # what carrying any prompt tokens adds to a step
    token_s: float = 0.0  # what each prompt token adds
    _moments: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def record(self, seconds: float, decodes: int, tokens: int) -> None:
        if not tokens:
            self.decode_s = _average(self.decode_s, seconds)
            return
        extra = max(seconds - (self.decode_s if decodes else 0.0), 0.0)
        weight = 0.2 if self._moments[0] else 1.0
        n, x, y, xx, xy = ((1 - weight) * m for m in self._moments)
        self._moments = (
            n + weight,
            x + weight * tokens,
            y + weight * extra,
            xx + weight * tokens**2,
            xy + weight * tokens * extra,
        )
        n, x, y, xx, xy = self._moments
        mean_x, mean_y = x / n, y / n
        spread = xx / n - mean_x**2
        slope = (xy / n - mean_x * mean_y) / spread if spread > 1.0 else 0.0
        if slope <= 0:  # one size of step seen so far (or noise): all of it per token
            self.fixed_s, self.token_s = 0.0, mean_y / mean_x
        else:
            self.token_s = slope
            self.fixed_s = max(mean_y - slope * mean_x, 0.0)

    def budget(self, spare_s: float) -> int:
        """Prompt tokens that fit in ``spare_s`` beside the decode rows; at least as many as
        make the fixed part worth paying (it is paid for one token as for many)."""
        worth = self.fixed_s / self.token_s
        return int(max((spare_s - self.fixed_s) / self.token_s, worth, MIN_CHUNK))


def _average(old: float, new: float, weight: float = 0.2) -> float:
    return new if old == 0 else (1 - weight) * old + weight * new


@dataclass(eq=False)
class Row:
    prepared: Prepared
    emit: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    decoder: RowDecoder | None = None
    tokens: int = 0
    done: bool = False
    pending: str = ""  # text held back by the stream interval
    pending_logprobs: list[dict] = field(default_factory=list)  # of the tokens behind ``pending``
    held: int = 0  # steps since text was last sent
    started: bool = False  # some text was sent
    sent_at: float = 0.0  # monotonic time text was last sent
    seq: Any = None  # the adapter's sequence while the row holds KV memory
    prompt: int = 0  # tokens its prefill takes (prompt, and answer so far after a preemption)
    prefilled: int = 0
    chunked: bool = False  # a chunk of its prompt has run (since its last admission)
    gathered: int = 0  # steps its first chunk waited for other prompts to go with it (``gather_steps``)
    gone: bool = False  # the client left (seen by the housekeeping thread)
    gone_seen: tuple[float, int] | None = None  # (monotonic time, tokens) when that was seen
    token_times: list[float] = field(default_factory=list)  # monotonic time of each token (tracing only)
    preemptions: int = 0
    out_of_memory: int = 0  # OOMs while it ran alone
    index: int = 0  # which of its request's n answers
    number: int = 0  # the request's place in the order of submission (traces)
    siblings: list[Row] = field(default_factory=list)  # answers 1..n-1, started from this row's prompt KV

    @property
    def decoding(self) -> bool:
        return self.seq is not None and self.prefilled >= self.prompt and not self.done


def _coalesced(pending: list[tuple[Callable[..., None], tuple]], metrics: Metrics) -> list[tuple[Callable, tuple]]:
    """The measures of a report with one call per counter and gauge (each is an IPC call on
    Triton): the queue's last state, token and prefix-cache counts summed; observations as they are."""
    out: list[tuple[Callable, tuple]] = []
    queue: tuple | None = None
    tokens, queried, hit = 0, 0, 0
    for record, args in pending:
        if record == metrics.queue:
            queue = args
        elif record == metrics.tokens:
            tokens += args[0]
        elif record == metrics.prefix_cache:
            queried, hit = queried + args[0], hit + args[1]
        else:
            out.append((record, args))
    if tokens:
        out.append((metrics.tokens, (tokens,)))
    if queried:
        out.append((metrics.prefix_cache, (queried, hit)))
    if queue is not None:
        out.append((metrics.queue, queue))
    return out


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)


def is_fatal(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory leaves the device unusable for this process."""
    text = str(exc)
    return not is_out_of_memory(exc) and ("CUDA error" in text or "CUBLAS_STATUS" in text or "device-side" in text)


class Scheduler:
    def __init__(
        self,
        adapter: Adapter,
        name: str,
        policy: Policy = "inflight",
        max_running: int = 16,
        max_waiting: int = 64,
        prefill_budget: int = 512,
        metrics: Metrics | None = None,
        stream_interval: int = 1,
        max_queue_wait_s: float = 60.0,
        on_fatal: Callable[[BaseException], None] | None = None,
        stream_gap_ms: float = 0.0,
        trace_path: str | None = None,
        step_multiple: float = 0.0,
        gather_steps: int = 0,
    ):
        self.adapter = adapter
        self.name = name
        self.policy = policy
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.stream_interval = stream_interval
        self.stream_gap_s = stream_gap_ms / 1000
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics or Metrics()
        self.on_fatal = on_fatal
        self.trace_path = trace_path
        self.step_multiple = step_multiple
        self.gather_steps = gather_steps
        self._pace = Pace()
        self.stats = Stats()
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []  # oldest first: preemption takes the newest
        self._wake = threading.Condition()
        self._closing = False
        self._drain = True
        self._reserved = 0  # places promised to requests being prepared
        self._hold = 0  # after an OOM in a prefill: admit only while fewer rows than this run
        self._measures: list[tuple[Callable[..., None], tuple]] = []
        self._measures_lock = threading.Lock()
        self._stopped = threading.Event()
        self._sweeps = threading.Condition()
        self._sweep_asked = self._sweep_done = 0  # turn numbers: the last sweep asked for, and done
        self._turns = 0
        self._numbers = itertools.count(1)  # requests, numbered in traces
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._housekeeper = threading.Thread(target=self._housekeeping, name=f"housekeeping-{name}", daemon=True)
        self._reporter = threading.Thread(target=self._reporting, name=f"metrics-{name}", daemon=True)
        self._thread.start()
        self._housekeeper.start()
        self._reporter.start()

    @property
    def kv(self):
        return self.adapter.kv

    # -- the edges' side

    def _refuse_when_full(self) -> None:
        """Under ``self._wake``: the capacity is MAX_RUNNING + MAX_WAITING requests in all (rows
        running, waiting, and places promised to requests still being prepared), so a burst
        that arrives before the running batch has filled still gets every place."""
        if self._closing:
            raise ShuttingDown(f"{self.name} is shutting down; retry on another instance")
        in_flight = len(self._running) + len(self._waiting) + self._reserved
        if in_flight >= self.max_running + self.max_waiting:
            self.stats.rejected += 1
            raise Overloaded(
                f"{self.name} is at capacity: {in_flight} requests in flight "
                f"(MAX_RUNNING={self.max_running} + MAX_WAITING={self.max_waiting}); retry later"
            )

    def check_capacity(self) -> None:
        """Raise ``Overloaded`` at once when the queue is full: the cheap check before the
        costly part of a request (decoding its image), so overload is refused fast."""
        with self._wake:
            self._refuse_when_full()

    def reserve(self) -> None:
        """Promise a place in the queue to a request about to be prepared (or refuse at once);
        ``submit(..., reserved=True)`` or ``unreserve()`` ends the promise."""
        with self._wake:
            self._refuse_when_full()
            self._reserved += 1

    def unreserve(self) -> None:
        with self._wake:
            self._reserved -= 1

    def submit(self, prepared: Prepared, emit: Callable[[Event], None], reserved: bool = False) -> Row:
        """Queue one request; raises ``Overloaded`` at once when the waiting queue is full
        (unless a place was reserved for it)."""
        row = Row(prepared, emit, number=next(self._numbers))
        row.siblings = [
            Row(sibling, emit, index=i, number=row.number) for i, sibling in enumerate(prepared.siblings, 1)
        ]
        with self._wake:
            if reserved:
                self._reserved -= 1
                if self._closing:
                    raise ShuttingDown(f"{self.name} is shutting down; retry on another instance")
            else:
                self._refuse_when_full()
            self._waiting.append(row)
            self._wake.notify()
        self._report()
        return row

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop: ``drain`` finishes what is queued and running first, within ``timeout``;
        whatever is left (or everything, without ``drain``) fails with ``ShuttingDown``."""
        with self._wake:
            self._closing, self._drain = True, drain
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._wake:
                self._drain = False
                self._wake.notify()
            self._thread.join(timeout)
        self._stopped.set()
        self._housekeeper.join(timeout)
        self._reporter.join(timeout)
        self._flush_measures()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the housekeeping thread: cancellation and metrics, off the step loop

    def _reporting(self) -> None:
        """Metrics, about once a second, on a thread of their own: a long report (one IPC call
        per measure on Triton) never delays a cancellation sweep the loop waits for."""
        while not self._stopped.wait(1.0):
            self._flush_measures()

    def _housekeeping(self) -> None:
        while not self._stopped.is_set():
            with self._sweeps:
                if self._sweep_done >= self._sweep_asked:
                    self._sweeps.wait(CANCEL_CHECK_SECONDS)
                asked = self._sweep_asked  # read before the sweep begins: it covers this ask
            self._sweep()
            with self._sweeps:
                self._sweep_done = max(self._sweep_done, asked)
                self._sweeps.notify_all()

    def _sweep(self) -> None:
        """Ask every row's client whether it left."""
        with self._wake:
            rows = [row for row in (*self._running, *self._waiting) if not row.gone and not row.done]
        left = False
        for row in rows:
            try:
                if row.prepared.cancelled():
                    row.gone_seen = (time.monotonic(), row.tokens)
                    row.gone = left = True
            except Exception:
                log.debug("%s: cancellation check failed", self.name, exc_info=True)
        if left:
            with self._wake:
                self._wake.notify()

    def _ask_for_sweep(self) -> None:
        """On the loop, every ``CANCEL_CHECK_STEPS`` turns: wait for the last sweep asked for
        (rarely: a sweep takes far less than that many steps), then ask for the next."""
        self._turns += 1
        if self._turns % CANCEL_CHECK_STEPS:
            return
        with self._sweeps:
            waited = time.monotonic()
            while self._sweep_done < self._sweep_asked and self._housekeeper.is_alive():
                if time.monotonic() - waited > SWEEP_WAIT_MAX_S:
                    log.warning("%s: a cancellation sweep took over %g s; going on", self.name, SWEEP_WAIT_MAX_S)
                    break
                self._sweeps.wait(CANCEL_CHECK_SECONDS)
            self._sweep_asked = self._turns
            self._sweeps.notify_all()

    def _flush_measures(self) -> None:
        with self._measures_lock:
            pending, self._measures = self._measures, []
        for record, args in _coalesced(pending, self.metrics):
            try:
                record(*args)
            except Exception:  # metrics are reported, never allowed to fail a row
                log.warning("%s: metrics update failed", self.name, exc_info=True)
        try:
            self.metrics.reported()
        except Exception:
            log.warning("%s: metrics update failed", self.name, exc_info=True)

    # -- the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self._running or self._closing):
                    self._wake.wait()
                if self._closing and not (self._drain and (self._waiting or self._running)):
                    break
            try:
                self._turn()
            except Exception as exc:  # a bug outside one row: fail the rows in play, go on
                log.exception("%s: scheduler step failed", self.name)
                self._fatal(exc)
                self._fail_running(exc)
        error = ShuttingDown(f"{self.name} shut down before this request finished")
        with self._wake:
            left, self._waiting = list(self._waiting) + self._running, deque()
        for row in left:
            if not row.done:  # rows that finished in the last step already had their final event
                self._fail(row, error)
        self._fail_running(error)
        self._report()

    def _turn(self) -> None:
        self._ask_for_sweep()
        self._release()
        self._admit()
        prefill_tokens, decoding = self._step()
        self.stats.turns.append((prefill_tokens, decoding))
        del self.stats.turns[:-4096]
        self._report()

    def _release(self) -> None:
        """Rows that finished, failed or were cancelled leave; clients that left the queue or
        waited too long free their place."""
        for row in self._running:
            if row.gone and not row.done:
                self._finish(row, "cancelled", row.pending)  # text held back goes with the result
        keep = [row for row in self._running if not row.done]
        for row in self._running:
            if row.done:
                self._free(row)
        self._running = keep
        now = time.monotonic()
        with self._wake:
            gone = [row for row in self._waiting if row.gone]
            late = [row for row in self._waiting if now - row.submitted > self.max_queue_wait_s and not row.gone]
            for row in gone + late:
                self._waiting.remove(row)
            self.stats.rejected += len(late)  # under the lock: request threads count refusals too
        for row in gone:
            self._cancel_waiting(row)
        for row in late:  # waited too long: a clear 503 rather than a request that hangs
            self._fail(
                row,
                Overloaded(
                    f"{self.name} is busy: the request waited {now - row.submitted:.0f} s in the queue "
                    f"(MAX_QUEUE_WAIT_S={self.max_queue_wait_s:g}); retry later"
                ),
            )

    def _free(self, row: Row) -> None:
        if row.seq is not None:
            try:
                self.adapter.free(row.seq)
            finally:
                row.seq = None

    def _room(self, need: int, rows: int) -> bool:
        """Whether the pool has ``need`` free pages, and a reserve of a page for every fourth
        running row beyond them (so the next decode steps do not preempt at once)."""
        if self.kv is None:
            return True
        return need + -(-rows // 4) <= self.kv.pages.free_pages

    def _sequence(self, row: Row) -> Any:
        """The row's sequence (made once per admission: a preempted row's includes its answer so far)."""
        if row.seq is None:
            generated = list(row.decoder.ids) if row.decoder is not None and self.adapter.resumable else []
            row.seq = self.adapter.start(row.prepared, generated)
            row.prompt = self.adapter.prompt_length(row.seq)
        return row.seq

    def _take_pages(self, row: Row, hit: list[int]) -> bool:
        """The row's pages: ``hit`` (cached, shared) and new ones for the rest of its prompt."""
        if self.kv is None:
            return True
        if not self.kv.pages.admit(row.seq.key, hit, row.prompt):
            return False
        row.prefilled = row.seq.cached = len(hit) * self.kv.page_size
        row.chunked, row.gathered = False, 0
        self._measure(self.metrics.prefix_cache, row.prompt, row.prefilled)
        return True

    def _admit(self) -> None:
        """Waiting rows, oldest first, while a row is free and the pool has their pages (the
        cached pages their prompt starts with cost nothing)."""
        if self.policy == "static" and self._running:
            return
        limit = self.max_running if not self._hold else min(self.max_running, self._hold)
        admitted: list[Row] = []
        while len(self._running) + len(admitted) < limit:
            with self._wake:
                if not self._waiting:
                    break
                row = self._waiting[0]
            if row.gone:  # the housekeeper asks clients (an IPC call on Triton): never the loop
                self._pop_waiting(row)
                self._cancel_waiting(row)
                continue
            try:
                seq = self._sequence(row)
            except Exception as exc:
                self._pop_waiting(row)
                self._fail(row, exc)
                continue
            hit = self.adapter.prefix_hit(seq) if self.kv is not None else []
            need = self.kv.pages.cost(hit, row.prompt) if self.kv is not None else 0
            if not self._room(need, len(self._running) + len(admitted)) or not self._take_pages(row, hit):
                break  # oldest first: the next ones wait too
            self._pop_waiting(row)
            admitted.append(row)
        now = time.monotonic()
        for row in admitted:
            if row.decoder is None:
                row.decoder = self.adapter.decoder(row.prepared)
            if row.preemptions == 0:
                self.stats.admitted += 1
                self._measure(self.metrics.waited, now - row.submitted)
            self._running.append(row)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))

    def _pop_waiting(self, row: Row) -> None:
        with self._wake:
            self._waiting.remove(row)

    def _chunk_budget(self, decoding: int) -> int:
        """Prompt tokens this step may carry: ``PREFILL_BUDGET``, and with rows decoding, as
        many as keep the step within ``prefill_step_multiple`` decode steps (measured online:
        a decode-only step's time, and what prompts add to a step: a fixed part and per token)."""
        if self.policy != "inflight":
            return 1 << 62
        budget = self.prefill_budget
        pace = self._pace
        if decoding and self.step_multiple > 0 and pace.decode_s > 0 and pace.token_s > 0:
            budget = min(budget, pace.budget((self.step_multiple - 1) * pace.decode_s))
        return budget

    def _step(self) -> tuple[int, int]:
        """One forward: a token for every decoding row and prompt chunks of the others, within
        the step's budget. Returns (prompt tokens, decode rows)."""
        decoding = self._pages_for_next_token([row for row in self._running if row.decoding])
        budget = self._chunk_budget(len(decoding))
        items: list[tuple[Row, int, int]] = []
        for row in self._running:
            if row.done or row.seq is None or row.prefilled >= row.prompt or budget <= 0:
                continue
            end = self.adapter.chunk_end(row.seq, row.prefilled, budget)
            items.append((row, row.prefilled, end))
            budget -= end - row.prefilled
        if items and decoding and self._gathering(items, budget):
            items = []
        if not decoding and not items:
            return 0, 0
        return self._run(decoding, items)

    def _gathering(self, items: list[tuple[Row, int, int]], budget_left: int) -> bool:
        """Whether new prompts wait a step for others to go with them (``gather_steps``): a
        step whose prompts reach images not yet encoded pays the vision encoder's call, a
        fixed part whatever the number of images, so several prompts in one step cost much
        less than one step each. They wait only while rows are decoding, every one of them
        needs the encoder (a prompt without, such as one whose image is cached, goes at once
        and takes the others along), none has begun, their tokens leave room in the step's
        budget, and for ``gather_steps`` steps at most."""
        rows = [row for row, _, _ in items]
        if self.gather_steps <= 0 or budget_left <= 0 or any(row.chunked for row in rows):
            return False
        if not all(self.adapter.needs_encoder(row.seq, start, end) for row, start, end in items):
            return False
        if max(row.gathered for row in rows) >= self.gather_steps:
            return False
        for row in rows:
            row.gathered += 1
        self.stats.gathered += len(rows)
        return True

    def _run(self, decoding: list[Row], items: list[tuple[Row, int, int]]) -> tuple[int, int]:
        start = time.perf_counter()
        try:
            outputs, finished = self.adapter.step([row.seq for row in decoding], [(r.seq, b, e) for r, b, e in items])
        except Exception as exc:
            self._step_failed(decoding, items, exc)
            return 0, 0
        seconds = time.perf_counter() - start
        tokens = sum(end - begin for _, begin, end in items)
        self._pace.record(seconds, len(decoding), tokens)
        if items:
            self._measure(self.metrics.step, "prefill", seconds, len(items))
            self.stats.prefills += 1
            self.stats.prefill_tokens += tokens
        if decoding:
            self._measure(self.metrics.step, "decode", seconds, len(decoding))
            self.stats.decode_steps += 1
        rows, results = list(decoding), list(outputs)
        for (row, _, end), output in zip(items, finished, strict=True):
            row.prefilled = end
            row.chunked = True
            if output is not None:
                rows.append(row)
                results.append(output)
                if row.siblings:
                    self._fork(row)
        self._apply(rows, results)
        return tokens, len(decoding)

    def _step_failed(self, decoding: list[Row], items: list[tuple[Row, int, int]], exc: BaseException) -> None:
        """Out of memory: the newest rows wait. A prompt chunk's error fails its row alone (each
        part is run again on its own to find it); a decode step's fails the running rows."""
        if is_out_of_memory(exc):
            if items:
                self._prefill_out_of_memory([row for row, _, _ in items], exc)
                return
            self.stats.out_of_memory += 1
            log.warning("%s: out of memory in a decode step of %d rows: preempting", self.name, len(decoding))
            self._clear_device_cache()
            if len(decoding) == 1:
                self._alone_out_of_memory(decoding[0], exc)
            else:
                self._preempt(decoding[-1])
            return
        self._fatal(exc)
        if items and (decoding or len(items) > 1):  # find the part at fault: each alone
            if decoding:
                self._run(decoding, [])
            for item in items:
                if not item[0].done:
                    self._run([], [item])
            return
        if items:
            log.warning("%s: prefill failed: %s", self.name, exc, exc_info=exc)
            self._fail(items[0][0], exc)
            return
        log.exception("%s: decode step failed for %d rows", self.name, len(decoding), exc_info=exc)
        self._fail_running(exc)

    def _fork(self, row: Row) -> None:
        """The other answers of an n > 1 request start on ``row``'s prompt: its full pages are
        shared (by reference), the partial page after them copied; each prefills only its last
        prompt token, by its own sampling. A sibling that finds no room waits in the queue and
        is prefilled whole."""
        siblings, row.siblings = row.siblings, []
        for sibling in siblings:
            try:
                self._sequence(sibling)
                shared: list[int] = []
                if self.kv is not None:
                    full, rest = divmod(sibling.prompt - 1, self.kv.page_size)
                    source = self.kv.pages.pages(row.seq.key)
                    shared = source[:full]
                if not self._take_pages(sibling, shared):
                    self._free(sibling)  # no pages now: it queues like any request
                    with self._wake:
                        self._waiting.appendleft(sibling)
                    continue
                if self.kv is not None and rest:
                    self.kv.copy_page(source[full], self.kv.pages.pages(sibling.seq.key)[full])
                    sibling.prefilled = sibling.seq.cached = sibling.prompt - 1
                sibling.decoder = self.adapter.decoder(sibling.prepared)
            except Exception as exc:
                self._free(sibling)
                self._fail(sibling, exc)
                continue
            self.stats.admitted += 1
            self._running.append(sibling)

    def _siblings_end(self, row: Row, event: Event) -> None:
        """A request's first answer ended before its prompt was prefilled: its siblings end alike."""
        siblings, row.siblings = row.siblings, []
        for sibling in siblings:
            sibling.done = True
            self._send(sibling, Event(result=event.result, error=event.error))

    def _pages_for_next_token(self, rows: list[Row]) -> list[Row]:
        """Every decoding row gets room for one more token; when the pool is full, the newest
        rows (decoding or not) give theirs back and wait."""
        if self.kv is None:
            return rows
        pages = self.kv.pages
        for row in rows:
            while row.seq is not None and not pages.grow(row.seq.key, row.seq.cached + 1):
                victim = next(r for r in reversed(self._running) if r.seq is not None)
                self._preempt(victim)
        return [row for row in rows if row.seq is not None and not row.done]

    def _preempt(self, row: Row) -> None:
        """Free the row's KV memory and put it back at the front of the queue."""
        if not self.adapter.resumable:
            self._fail(row, TooLarge(f"{self.name}: out of memory for this request"))
            self._free(row)
            self._running.remove(row)
            return
        self._free(row)
        self._running.remove(row)
        row.preemptions += 1
        self.stats.preempted += 1
        with self._wake:
            self._waiting.appendleft(row)
        log.info("%s: a row was preempted (%d tokens so far); it will be prefilled again", self.name, row.tokens)

    def _prefill_out_of_memory(self, rows: list[Row], exc: BaseException) -> None:
        self.stats.out_of_memory += 1
        self._clear_device_cache()
        others = [row for row in self._running if row not in rows]
        log.warning(
            "%s: out of memory prefilling %d rows (%d others running): preempting", self.name, len(rows), len(others)
        )
        if len(rows) == 1 and not others:
            self._alone_out_of_memory(rows[0], exc)
            return
        for row in reversed(rows):
            self._preempt(row)
        self._hold = max(1, len(self._running) + max(1, len(rows) // 2))

    def _alone_out_of_memory(self, row: Row, exc: BaseException) -> None:
        """Nothing else to preempt: try again (the memory may have been a passing peak), then fail."""
        row.out_of_memory += 1
        if row.out_of_memory > ALONE_OOM_RETRIES:
            self._fail(row, TooLarge(f"{self.name}: this request does not fit in device memory even alone: {exc}"))

    def _clear_device_cache(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            log.debug("emptying the CUDA cache failed", exc_info=True)

    def _fatal(self, exc: BaseException) -> None:
        if is_fatal(exc) and self.on_fatal is not None:
            log.critical("%s: fatal device error: %s", self.name, exc)
            self.on_fatal(exc)

    def _apply(self, rows: list[Row], outputs: list[Any]) -> None:
        produced = 0
        now = time.monotonic()
        for row, output in zip(rows, outputs, strict=True):
            if row.done:
                continue
            try:
                step = row.decoder.push(output)
            except Exception as exc:
                self._fail(row, exc)
                continue
            row.tokens += step.tokens
            produced += step.tokens
            if self.trace_path is not None:
                row.token_times += [now] * step.tokens
            row.pending += step.delta
            row.pending_logprobs += step.logprobs
            row.held += 1
            if step.stop:
                self._finish(row, "stop", row.pending)
            elif row.tokens >= row.prepared.params.max_tokens:
                self._finish(row, "length", row.pending)
            elif row.pending and (not row.started or self._due(row, now)):
                self._send(row, Event(row.pending, logprobs=row.pending_logprobs or None))  # the first at once
                row.pending, row.held, row.started, row.pending_logprobs = "", 0, True, []
                row.sent_at = now
        if any(row.done for row in rows):
            self._hold = 0  # a row left: memory came back
        self.stats.tokens += produced
        self._measure(self.metrics.tokens, produced)

    def _due(self, row: Row, now: float) -> bool:
        """A started row's held text goes out after ``stream_interval`` tokens and, when a
        gap is set, no sooner than ``stream_gap_ms`` after its last text, unless it was held
        for ``MAX_HELD_STEPS`` steps. A request whose edge sends only the answer gets its text
        every ``MAX_HELD_STEPS`` steps alone: those events are its edge's heartbeats."""
        if row.held < self.stream_interval:
            return False
        if not row.prepared.streamed:
            return row.held >= MAX_HELD_STEPS
        return now - row.sent_at >= self.stream_gap_s or row.held >= MAX_HELD_STEPS

    # -- row endings

    def _finish(self, row: Row, reason: str, pending: str = "") -> None:
        try:
            rest, result = row.decoder.finish(reason)
        except Exception as exc:
            self._fail(row, exc)
            return
        result.prompt_tokens = prompt_length(row.prepared)
        row.done = True
        self._free(row)  # its pages come back before its client hears it ended
        self._send(row, Event(pending + rest, result, logprobs=row.pending_logprobs or None))

    def _cancel_waiting(self, row: Row) -> None:
        row.done = True
        if row.decoder is not None:  # preempted after it had started
            self._finish(row, "cancelled", row.pending)
            return
        self._send(
            row,
            Event(result=Result("", 0, "cancelled", prompt_tokens=prompt_length(row.prepared))),
        )

    def _fail(self, row: Row, exc: BaseException) -> None:
        row.done = True
        try:
            self._free(row)
        except Exception:
            log.warning("%s: freeing a failed row's memory failed", self.name, exc_info=True)
        if not isinstance(exc, EngineError):
            exc = EngineError(f"{type(exc).__name__}: {exc}")
        self._send(row, Event(error=exc))

    def _fail_running(self, exc: BaseException) -> None:
        for row in self._running:
            if not row.done:
                self._fail(row, exc)
            try:
                self._free(row)
            except Exception:
                log.warning("%s: freeing a row's memory failed", self.name, exc_info=True)
        self._running = []

    def _send(self, row: Row, event: Event) -> None:
        event.index = row.index
        if event.final and self.trace_path is not None:
            self._measure(self._write_trace, self._trace(row, event))
        if event.final and row.siblings:
            self._siblings_end(row, event)
        try:
            row.emit(event)
        except Exception:  # the client is gone: stop generating for it
            log.debug("%s: emit failed; row dropped", self.name, exc_info=True)
            row.done = True

    def _trace(self, row: Row, event: Event) -> dict[str, Any]:
        """One finished row, for ``trace_path``: monotonic times (``time.monotonic``: one clock
        for every process of the host) and what ended it."""
        gone = row.gone_seen
        return {
            "model": self.name,
            "row": row.number,
            "index": row.index,
            "end": event.result.finish_reason if event.result is not None else type(event.error).__name__,
            "prompt_tokens": row.prepared.prompt_tokens,
            "tokens": row.tokens,
            "submitted": row.submitted,
            "ended": time.monotonic(),
            "cancel_seen": None if gone is None else {"time": gone[0], "tokens": gone[1]},
            "token_times": row.token_times,
        }

    def _write_trace(self, record: dict[str, Any]) -> None:
        with open(self.trace_path, "a", encoding="utf-8") as trace:
            trace.write(json.dumps(record) + "\n")

    def _report(self) -> None:
        self._measure(self.metrics.queue, len(self._running), len(self._waiting))

    def _measure(self, record: Callable[..., None], *args: Any) -> None:
        """Recorded here, reported by the housekeeping thread about once a second (on Triton
        each report is an IPC call)."""
        with self._measures_lock:
            self._measures.append((record, args))


def prompt_length(prepared) -> int:
    """The prompt's tokens as usage counts them: all the model read, image tokens included."""
    return prepared.input_tokens or prepared.prompt_tokens
