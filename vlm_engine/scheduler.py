"""In-flight (continuous) batching over paged KV memory: requests join and leave a running
batch at every step, and a request waits rather than fails when memory is short.

One ``Scheduler`` per loaded model runs one thread, the step loop. Each turn of the loop:

1. **release**: rows that finished, were cancelled or failed leave; their KV pages are free
   (nothing else is copied);
2. **admit**: waiting requests, oldest first, while there is a row free (``MAX_RUNNING``)
   and the KV pool has pages for the whole prompt plus a small reserve;
3. **prefill**: prompt chunks of the admitted rows, at most ``PREFILL_BUDGET`` tokens per
   turn (an image and its tokens always go in one chunk), so running streams keep their
   pace while a long prompt comes in; a row whose prompt is complete sends its first text;
4. **decode**: one step for every row that has its prompt in: each gets a page when its
   last one is full; when none is free the newest rows are **preempted**: their pages are
   freed and they go back to the front of the queue, to be prefilled again with what they
   had generated (vLLM's recompute preemption). Nothing they sent is sent twice.

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

from vlm_engine.adapters.base import Adapter, Prepared, Result, RowDecoder
from vlm_engine.errors import EngineError, Overloaded, ShuttingDown, TooLarge

log = logging.getLogger("vlm_engine.scheduler")
CANCEL_CHECK_SECONDS = 0.05  # how often rows are asked whether their client left, at least
CANCEL_CHECK_STEPS = 8  # ... and every this many turns of the loop
SWEEP_WAIT_MAX_S = 1.0  # the longest the loop waits for a late sweep before going on (and saying so)
MAX_HELD_STEPS = 32  # a streamed row's text is held (STREAM_GAP_MS) for at most this many steps
ALONE_OOM_RETRIES = 2  # a row alone that runs out of memory is tried again this often, then fails
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
    turns: list[tuple[int, int]] = field(default_factory=list)  # recent (prefill tokens, decode rows) per turn


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
        for record, args in pending:
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
        prefill_tokens = self._prefill()
        self._release()
        decoding = self._decode()
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
        for row in gone:
            self._cancel_waiting(row)
        for row in late:  # waited too long: a clear 503 rather than a request that hangs
            self.stats.rejected += 1
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

    def _pages_needed(self, row: Row, generated: int) -> int:
        if self.kv is None:
            return 0
        return self.kv.pages.pages_for(self.adapter.prefill_cost(row.prepared) + generated)

    def _room(self, need: int, promised: int, rows: int) -> bool:
        """Whether the pool has ``need`` pages beyond ``promised`` ones, and a reserve of a page
        for every fourth running row (so the next decode steps do not preempt at once)."""
        if self.kv is None:
            return True
        reserve = -(-rows // 4)
        return need + promised + reserve <= self.kv.pages.free_pages

    def _admit(self) -> None:
        if self.policy == "static" and self._running:
            return
        limit = self.max_running if not self._hold else min(self.max_running, self._hold)
        admitted: list[Row] = []
        promised = 0
        with self._wake:
            while self._waiting and len(self._running) + len(admitted) < limit:
                row = self._waiting[0]
                if row.gone or row.prepared.cancelled():  # asked once per admission, not per step
                    self._waiting.popleft()
                    self._cancel_waiting(row)
                    continue
                generated = len(row.decoder.ids) if row.decoder is not None and self.adapter.resumable else 0
                need = self._pages_needed(row, generated)
                if not self._room(need, promised, len(self._running) + len(admitted)):
                    break  # oldest first: the next ones wait too
                self._waiting.popleft()
                admitted.append(row)
                promised += need
        now = time.monotonic()
        for row in admitted:
            try:
                self._start(row)
            except Exception as exc:
                self._fail(row, exc)
                continue
            if row.preemptions == 0:
                self.stats.admitted += 1
                self._measure(self.metrics.waited, now - row.submitted)
            self._running.append(row)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))

    def _start(self, row: Row) -> None:
        generated = list(row.decoder.ids) if row.decoder is not None and self.adapter.resumable else []
        row.seq = self.adapter.start(row.prepared, generated)
        row.prompt, row.prefilled = self.adapter.prompt_length(row.seq), 0
        if self.kv is not None and not self.kv.pages.grow(row.seq.key, row.prompt):
            self._free(row)
            raise TooLarge(f"{self.name}: no KV memory for a prompt of {row.prompt} tokens")
        if row.decoder is None:
            row.decoder = self.adapter.decoder(row.prepared)

    def _prefill(self) -> int:
        """One forward over the next prompt chunk of rows still prefilling, within the budget."""
        budget = self.prefill_budget if self.policy == "inflight" else 1 << 62
        items: list[tuple[Row, int, int]] = []
        for row in self._running:
            if row.done or row.seq is None or row.prefilled >= row.prompt or budget <= 0:
                continue
            end = self.adapter.chunk_end(row.seq, row.prefilled, budget)
            items.append((row, row.prefilled, end))
            budget -= end - row.prefilled
        return self._run_prefill(items)

    def _run_prefill(self, items: list[tuple[Row, int, int]]) -> int:
        if not items:
            return 0
        start = time.perf_counter()
        try:
            outputs = self.adapter.prefill([(row.seq, begin, end) for row, begin, end in items])
        except Exception as exc:
            if is_out_of_memory(exc):
                self._prefill_out_of_memory([row for row, _, _ in items], exc)
                return 0
            self._fatal(exc)
            if len(items) > 1:  # find the row at fault: each alone
                return sum(self._run_prefill([item]) for item in items)
            log.warning("%s: prefill failed: %s", self.name, exc)
            self._fail(items[0][0], exc)
            return 0
        tokens = sum(end - begin for _, begin, end in items)
        self._measure(self.metrics.step, "prefill", time.perf_counter() - start, len(items))
        self.stats.prefills += 1
        self.stats.prefill_tokens += tokens
        finished = []
        for (row, _, end), output in zip(items, outputs, strict=True):
            row.prefilled = end
            if output is not None:
                finished.append((row, output))
                if row.siblings:
                    self._fork(row)
        self._apply([row for row, _ in finished], [output for _, output in finished])
        return tokens

    def _fork(self, row: Row) -> None:
        """The other answers of an n > 1 request start from ``row``'s prompt: its K/V is copied
        into their pages up to the last prompt token, which each prefills itself (its own
        first token, by its own sampling). A sibling that finds no room waits in the queue and
        is prefilled whole."""
        siblings, row.siblings = row.siblings, []
        for sibling in siblings:
            try:
                self._start(sibling)
                shared = sibling.prompt - 1
                if shared > 0 and self.adapter.share_prefix(row.seq, sibling.seq, shared):
                    sibling.prefilled = shared
            except Exception as exc:
                self._free(sibling)
                if isinstance(exc, TooLarge):  # no pages now: it queues like any request
                    sibling.decoder = None
                    with self._wake:
                        self._waiting.appendleft(sibling)
                    continue
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

    def _decode(self) -> int:
        rows = [row for row in self._running if row.decoding]
        if not rows:
            return 0
        rows = self._pages_for_next_token(rows)
        if not rows:
            return 0
        start = time.perf_counter()
        try:
            outputs = self.adapter.decode([row.seq for row in rows])
        except Exception as exc:
            if is_out_of_memory(exc):
                self.stats.out_of_memory += 1
                log.warning("%s: out of memory in a decode step of %d rows: preempting", self.name, len(rows))
                self._clear_device_cache()
                if len(rows) == 1:
                    self._alone_out_of_memory(rows[0], exc)
                else:
                    self._preempt(rows[-1])
                return 0
            log.exception("%s: decode step failed for %d rows", self.name, len(rows))
            self._fatal(exc)
            self._fail_running(exc)
            return 0
        self._measure(self.metrics.step, "decode", time.perf_counter() - start, len(rows))
        self.stats.decode_steps += 1
        self._apply(rows, outputs)
        return len(rows)

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
        for ``MAX_HELD_STEPS`` steps."""
        if row.held < self.stream_interval:
            return False
        return now - row.sent_at >= self.stream_gap_s or row.held >= MAX_HELD_STEPS

    # -- row endings

    def _finish(self, row: Row, reason: str, pending: str = "") -> None:
        try:
            rest, result = row.decoder.finish(reason)
        except Exception as exc:
            self._fail(row, exc)
            return
        result.prompt_tokens = row.prepared.prompt_tokens
        row.done = True
        self._send(row, Event(pending + rest, result, logprobs=row.pending_logprobs or None))

    def _cancel_waiting(self, row: Row) -> None:
        row.done = True
        if row.decoder is not None:  # preempted after it had started
            self._finish(row, "cancelled", row.pending)
            return
        self._send(row, Event(result=Result("", 0, "cancelled", prompt_tokens=row.prepared.prompt_tokens)))

    def _fail(self, row: Row, exc: BaseException) -> None:
        row.done = True
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
