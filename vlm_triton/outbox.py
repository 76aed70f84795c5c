"""The stream model's outgoing responses: a queue that one sender thread drains.

When the sender falls behind (Triton's IPC is slower than the step loop for a moment), the
text events waiting for one request are joined into one response, so a slow moment costs
fewer, larger messages instead of a growing backlog (vLLM's output processor does the same
in effect). A request's events keep their order; final events are never merged away.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from typing import Any

from vlm_engine.scheduler import Event

Item = tuple[Any, bool, Event]  # (sender, streaming, event)


def coalesce(items: Iterable[Item]) -> list[Item]:
    """Consecutive text-only events of one answer (sender and index), with nothing of that
    answer between them, become one event; everything else keeps its place."""
    out: list[Item] = []
    open_text: dict[tuple[int, int], int] = {}  # (id(sender), answer) -> place in out of its last text event
    for sender, streaming, event in items:
        key = (id(sender), event.index)
        at = open_text.get(key)
        if not event.final and at is not None:
            previous = out[at]
            logprobs = (previous[2].logprobs or []) + (event.logprobs or [])
            joined = Event(text=previous[2].text + event.text, logprobs=logprobs or None, index=event.index)
            out[at] = (previous[0], previous[1], joined)
            continue
        if event.final:
            open_text.pop(key, None)
        else:
            open_text[key] = len(out)
        out.append((sender, streaming, event))
    return out


class Outbox:
    """Events from the scheduler's thread to the sender thread; ``close`` after the last."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self.sent_events = 0  # events handed in
        self.sent_responses = 0  # responses sent for them (fewer when coalesced)

    def put(self, item: Item) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)

    def drain(self, send: Callable[[Item], None]) -> None:
        """Send until closed: whatever is waiting is taken at once and coalesced."""
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            closed = None in items
            waiting = [item for item in items if item is not None]
            self.sent_events += len(waiting)
            for item in coalesce(waiting):
                self.sent_responses += 1
                send(item)
            if closed:
                return
