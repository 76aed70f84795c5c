"""Output processing: a row's tokens become the text its client sees, as they come.

- ``StreamText``: incremental detokenization (``tokenizers``' ``DecodeStream``, O(1) a token),
  leading whitespace dropped, trailing whitespace held back, so what is sent is always a
  prefix of the final answer;
- ``TokenDecoder``: EOS ends an answer; stop strings end it before them, and text that could
  still become one is held back; logprobs in OpenAI's shape;
- ``Result``: what a finished row gives its client.

The scheduler feeds each row's outputs to its ``RowDecoder`` after every step and sends what
comes out (``scheduler.Scheduler._apply``); moondream2's own API has a decoder of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm_engine.params import GenerationParams

if TYPE_CHECKING:
    from vlm_engine.adapters.base import GenerateAdapter


@dataclass
class Result:
    text: str
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    entities: list[dict[str, Any]] | None = None
    prompt_tokens: int = 0  # the prompt the model read: template and image tokens included
    logprobs: list[dict[str, Any]] | None = None  # per output token, OpenAI's shape (when asked)
    stop_sequence: str | None = None  # the stop string that ended the answer (finish_reason "stop")


@dataclass
class RowStep:
    """What one output did to a row: new visible text, tokens used, end of the answer."""

    delta: str = ""
    tokens: int = 1
    stop: bool = False
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # of this step's tokens, when asked


class RowDecoder(ABC):
    """Turns one row's outputs into text as they come."""

    @abstractmethod
    def push(self, output: Any) -> RowStep: ...

    @abstractmethod
    def finish(self, finish_reason: str) -> tuple[str, Result]:
        """The text not sent yet, and the row's result."""


class StreamText:
    """A row's visible text from ``tokenizers``' ``DecodeStream``: O(1) per token.

    Leading whitespace is dropped and trailing whitespace held back (the final answer is
    stripped), so what is sent is always a prefix of the answer."""

    def __init__(self, tokenizer: Any):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.emitted_chars = 0
        self.sent = ""  # what push has returned so far
        self.started = False
        self.held = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self.stream.step(self.tokenizer, token) or ""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if not body:
            self.held += piece
            return ""
        out, self.held = self.held + body, piece[len(body) :]
        self.emitted_chars += len(out)
        self.sent += out
        return out

    def flush(self, final_text: str) -> str:
        """The rest of ``final_text`` after what was sent."""
        rest = final_text[self.emitted_chars :]
        self.emitted_chars = len(final_text)
        return rest


class TokenDecoder(RowDecoder):
    """Token ids to text for HF models; EOS ends the answer and is not counted. Stop strings
    end it too: the text ends before the stop string, and text that could still become one
    is held back."""

    def __init__(self, adapter: GenerateAdapter, params: GenerationParams | None = None):
        self.adapter = adapter
        self.text = adapter.stream_text()
        self.eos = set() if adapter.settings.ignore_eos else adapter.eos
        self.stops = params.sampling.stop if params is not None else ()
        self.longest = max((len(s) for s in self.stops), default=0)
        self.shown = ""  # text released so far (stop strings only)
        self.stopped: tuple[int, str] | None = None  # where in the text a stop string began, and which
        self.logprobs: list[dict[str, Any]] | None = [] if params is not None and params.sampling.logprobs else None

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    def push(self, output: Any) -> RowStep:
        from vlm_engine.sampling import TokenLogprob

        if isinstance(output, BaseException):
            raise output
        entries = []
        if isinstance(output, TokenLogprob):
            entries = [self.adapter.logprob_entry(output)]
            output = output.token
        if output in self.eos:
            return RowStep(tokens=0, stop=True)
        if self.logprobs is not None:
            self.logprobs.extend(entries)
        delta = self.text.push(output)
        if not self.stops:
            return RowStep(delta, logprobs=entries)
        full = self.text.sent + self.text.held  # everything decoded so far, leading spaces dropped
        hit = first_stop(full, self.stops, max(0, len(self.shown) - self.longest + 1))
        if hit is not None:
            self.stopped = (hit, next(s for s in self.stops if full.startswith(s, hit)))
            release = full[len(self.shown) : hit].rstrip()
            self.shown += release
            return RowStep(release, stop=True, logprobs=entries)
        hold = stop_prefix_length(full, self.stops)
        release = full[len(self.shown) : len(full) - hold].rstrip()
        self.shown += release
        return RowStep(release, logprobs=entries)

    def finish(self, finish_reason: str) -> tuple[str, Result]:
        result = self.adapter.finish(self.text.ids, finish_reason)
        result.logprobs = self.logprobs
        if not self.stops:
            return self.text.flush(result.text), result
        # where streaming found it (the final text is stripped: a stop string ending in
        # whitespace, "\n" say, is not in it any more), else where the final text has one
        hit, result.stop_sequence = self.stopped or (None, None)
        if hit is None:
            hit = first_stop(result.text, self.stops, 0)
            if hit is not None:
                result.stop_sequence = next(s for s in self.stops if result.text.startswith(s, hit))
        if hit is not None:
            result.text = result.text[:hit].rstrip()
        return result.text[len(self.shown) :], result


def first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the earliest stop string begins in ``text`` (from ``start``), if any does."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that is the start of a stop string."""
    for length in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(text[-length:]) for s in stops):
            return length
    return 0
