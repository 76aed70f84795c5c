"""Token streaming for a whole batch: a ``generate`` streamer and per-row text state."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

_END = object()


class BatchTokenStreamer(BaseStreamer):
    """Receives each step's new tokens for every row (HF's text streamers allow one row)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        self._queue.put(value.view(-1).tolist())

    def end(self) -> None:
        self._queue.put(_END)

    def fail(self, exc: BaseException) -> None:
        self._queue.put(exc)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class StopWhen(StoppingCriteria):
    """Stops ``generate`` once ``predicate()`` is true (all rows done or cancelled)."""

    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.predicate(), dtype=torch.bool, device=input_ids.device)


@dataclass
class RowText:
    """Incremental text of one row: emits only stable extensions of what was sent."""

    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    emitted: str = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        stable = text.rstrip()  # trailing spaces may be stripped or merged later
        if stable.endswith("\ufffd") or not stable.startswith(self.emitted):
            return ""
        delta = stable[len(self.emitted) :]
        self.emitted = stable
        return delta

    def flush(self, final_text: str) -> str:
        """The rest of ``final_text``; it extends what was sent unless decoding was unstable."""
        if not final_text.startswith(self.emitted):
            return ""
        delta = final_text[len(self.emitted) :]
        self.emitted = final_text
        return delta


def run_in_thread(target: Callable[[], object], streamer: BatchTokenStreamer) -> threading.Thread:
    """Run ``generate`` in a worker thread; its errors come out of the streamer."""

    def work() -> None:
        try:
            target()
        except BaseException as exc:  # re-raised in the consuming thread
            streamer.fail(exc)
        else:
            streamer.end()

    thread = threading.Thread(target=work, name="vlm-generate", daemon=True)
    thread.start()
    return thread
