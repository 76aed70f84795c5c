"""In-flight (continuous) batching: requests join and leave a running batch at every step.

One ``Scheduler`` per loaded model runs one thread, the step loop. Each turn of the loop:

1. **release**: rows that finished, were cancelled or failed leave the batch (their cache
   rows and any padding no remaining row needs are dropped);
2. **admit**: waiting requests, oldest first, while the running batch has room and the
   prefill budget lasts, are prefilled together and send their first output at once;
3. **merge**: their state joins the running batch;
4. **step**: one decode step for every running row, each with its own sampling settings.

The admission rule keeps running rows decoding: at most ``prefill_budget`` prompt tokens are
prefilled between two decode steps (one request is always admitted when there is room, so
a prompt above the budget still gets in, alone). ``policy="static"`` is the old behaviour,
kept for comparison: a batch is admitted only when the previous one has completely finished.

Edges (Triton's ``<model>_stream``, the FastAPI local backend) call ``submit`` with a
callback; it receives ``Event``s on the loop's thread and must not block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from vlm_engine.adapters.base import Adapter, Prepared, Result, RowDecoder
from vlm_engine.errors import EngineError, Overloaded, ShuttingDown

log = logging.getLogger("vlm_engine.scheduler")
CANCEL_CHECK_SECONDS = 0.05  # how often running rows are asked whether their client left
Policy = Literal["inflight", "static"]


@dataclass
class Event:
    """For one request: new ``text``; ``result`` on its last event, or ``error`` instead."""

    text: str = ""
    result: Result | None = None
    error: BaseException | None = None

    @property
    def final(self) -> bool:
        return self.result is not None or self.error is not None


class Metrics:
    """Where the scheduler reports; edges subclass it (Triton metrics, prometheus_client)."""

    def queue(self, running: int, waiting: int) -> None: ...

    def waited(self, seconds: float) -> None: ...

    def step(self, kind: str, seconds: float, rows: int) -> None: ...

    def tokens(self, count: int) -> None: ...


@dataclass
class Stats:
    """Counters since start, for tests and benchmarks."""

    admitted: int = 0
    prefills: int = 0
    decode_steps: int = 0
    tokens: int = 0
    largest_batch: int = 0
    rejected: int = 0


@dataclass(eq=False)
class Row:
    prepared: Prepared
    emit: Callable[[Event], None]
    submitted: float = field(default_factory=time.monotonic)
    decoder: RowDecoder | None = None
    tokens: int = 0
    done: bool = False
    pending: str = ""  # text held back by the stream interval
    held: int = 0  # steps since text was last sent
    started: bool = False  # some text was sent


class Scheduler:
    def __init__(
        self,
        adapter: Adapter,
        name: str,
        policy: Policy = "inflight",
        max_running: int = 16,
        max_waiting: int = 64,
        prefill_budget: int = 4096,
        metrics: Metrics | None = None,
        stream_interval: int = 1,
        max_queue_wait_s: float = 60.0,
    ):
        self.adapter = adapter
        self.name = name
        self.policy = policy
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.stream_interval = stream_interval
        self.max_queue_wait_s = max_queue_wait_s
        self.metrics = metrics or Metrics()
        self.stats = Stats()
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._state: Any = None
        self._wake = threading.Condition()
        self._closing = False
        self._drain = True
        self._cancel_checked = 0.0
        self._admitting: list[Row] = []  # taken from the queue, not yet in the batch
        self._reserved = 0  # places promised to requests being prepared
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

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
        row = Row(prepared, emit)
        with self._wake:
            if reserved:
                self._reserved -= 1
                if self._closing:
                    raise ShuttingDown(f"{self.name} is shutting down; retry on another instance")
            else:
                self._refuse_when_full()
            self._waiting.append(row)
            self._report()
            self._wake.notify()
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

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

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
                for row in self._admitting:
                    if not row.done:
                        self._fail(row, exc)
                self._admitting = []
                self._fail_running(exc)
        error = ShuttingDown(f"{self.name} shut down before this request finished")
        with self._wake:
            left, self._waiting = list(self._waiting) + self._running, deque()
        for row in left:
            if not row.done:  # rows that finished in the last step already had their final event
                self._fail(row, error)
        self._running, self._state = [], None
        self._report()

    def _turn(self) -> None:
        self._release()
        group = self._admitting = self._admit()
        if group:
            self._prefill(group)
            self._admitting = []
            self._release()
        if self._running:
            self._step()
        self._report()

    def _release(self) -> None:
        """Rows that finished, failed or were cancelled leave the batch.

        Asking whether a client left can cost a round trip (Triton's response sender), so
        running rows are asked every ``CANCEL_CHECK_SECONDS``, not at every step."""
        now = time.monotonic()
        if now - self._cancel_checked >= CANCEL_CHECK_SECONDS:
            self._cancel_checked = now
            for row in self._running:
                if not row.done and row.prepared.cancelled():
                    self._finish(row, "cancelled")
            with self._wake:  # clients that left while waiting free their place in the queue
                gone = [row for row in self._waiting if row.prepared.cancelled()]
                late = [row for row in self._waiting if now - row.submitted > self.max_queue_wait_s and row not in gone]
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
        keep = [i for i, row in enumerate(self._running) if not row.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if keep:
            self._state = self.adapter.select(self._state, keep)
        else:
            self._drop_state()

    def _admit(self) -> list[Row]:
        if self.policy == "static" and self._running:
            return []
        group: list[Row] = []
        budget = self.prefill_budget
        with self._wake:
            while self._waiting and len(self._running) + len(group) < self.max_running:
                row = self._waiting[0]
                if row.prepared.cancelled():
                    self._waiting.popleft()
                    self._cancel_waiting(row)
                    continue
                cost = self.adapter.prefill_cost(row.prepared)
                if group and cost > budget and self.policy == "inflight":
                    break
                self._waiting.popleft()
                group.append(row)
                budget -= cost
        now = time.monotonic()
        for row in group:
            self._measure(self.metrics.waited, now - row.submitted)
        return group

    def _prefill(self, group: list[Row]) -> None:
        start = time.perf_counter()
        try:
            state, outputs = self.adapter.prefill([row.prepared for row in group])
        except Exception as exc:
            if len(group) > 1:  # find the row at fault: each alone
                for row in group:
                    self._prefill([row])
                return
            log.warning("%s: prefill failed: %s", self.name, exc)
            self._fail(group[0], exc)
            return
        self._measure(self.metrics.step, "prefill", time.perf_counter() - start, len(group))
        self.stats.prefills += 1
        self.stats.admitted += len(group)
        for row in group:
            row.decoder = self.adapter.decoder(row.prepared)
        self._apply(group, outputs)
        self._state = state if self._state is None else self.adapter.merge(self._state, state)
        self._running.extend(group)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._running))

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.adapter.decode(self._state)
        except Exception as exc:
            log.exception("%s: decode step failed for %d rows", self.name, len(self._running))
            self._fail_running(exc)
            return
        self._measure(self.metrics.step, "decode", time.perf_counter() - start, len(self._running))
        self.stats.decode_steps += 1
        self._apply(self._running, outputs)

    def _apply(self, rows: list[Row], outputs: list[Any]) -> None:
        produced = 0
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
            row.pending += step.delta
            row.held += 1
            if step.stop:
                self._finish(row, "stop", row.pending)
            elif row.tokens >= row.prepared.params.max_tokens:
                self._finish(row, "length", row.pending)
            elif row.pending and (row.held >= self.stream_interval or not row.started):
                self._send(row, Event(row.pending))  # the first text goes out at once
                row.pending, row.held, row.started = "", 0, True
        self.stats.tokens += produced
        self._measure(self.metrics.tokens, produced)

    # -- row endings

    def _finish(self, row: Row, reason: str, pending: str = "") -> None:
        try:
            rest, result = row.decoder.finish(reason)
        except Exception as exc:
            self._fail(row, exc)
            return
        result.prompt_tokens = row.prepared.prompt_tokens
        row.done = True
        self._send(row, Event(pending + rest, result))

    def _cancel_waiting(self, row: Row) -> None:
        row.done = True
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
        self._running = []
        self._drop_state()

    def _drop_state(self) -> None:
        """Every row has left: the adapter may keep what the state held for the next rows."""
        state, self._state = self._state, None
        if state is not None:
            try:
                self.adapter.release(state)
            except Exception:
                log.warning("%s: releasing the batch state failed", self.name, exc_info=True)

    def _send(self, row: Row, event: Event) -> None:
        try:
            row.emit(event)
        except Exception:  # the client is gone: stop generating for it
            log.debug("%s: emit failed; row dropped", self.name, exc_info=True)
            row.done = True

    def _report(self) -> None:
        self._measure(self.metrics.queue, len(self._running), len(self._waiting))

    def _measure(self, record: Callable[..., None], *args: Any) -> None:
        """Metrics are reported, never allowed to fail a row (on Triton they are IPC calls)."""
        try:
            record(*args)
        except Exception:
            log.warning("%s: metrics update failed", self.name, exc_info=True)
