"""The backend interface: stream one conversation's answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlm_engine.chat import Message


@dataclass
class GenerationRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = True  # False: the backend may deliver the whole answer at once
    sampling: dict[str, Any] | None = None  # seed, stop, penalties, logprobs, guide, logit_bias (params.Sampling)
    tools: dict[str, Any] | None = None  # tools, tool_choice, parallel_tool_calls (VLMEngine.prepare)
    n: int = 1  # answers to the prompt: the stream carries n Finals, items tagged with ``index``
    raw: bool = False  # the one user message's text is the whole prompt, no chat template (completions)
    count_only: bool = False  # one Final with the prompt's length, nothing generated (count_tokens)


class Delta(str):
    """A text chunk that also carries the logprobs of its tokens (requests that asked)."""

    logprobs: list[dict[str, Any]] | None
    index: int  # which answer (n > 1)

    def __new__(cls, text: str, logprobs: list[dict[str, Any]] | None = None, index: int = 0) -> Delta:
        chunk = super().__new__(cls, text)
        chunk.logprobs, chunk.index = logprobs, index
        return chunk


@dataclass
class Final:
    """The last item of a stream: the whole answer and its accounting."""

    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    entities: list[dict[str, Any]] | None = field(default=None)
    logprobs: list[dict[str, Any]] | None = field(default=None)  # every output token's (when asked)
    index: int = 0  # which answer (n > 1)
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> dict[str, bool]:
        """Readiness of every served model (raises nothing)."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[str | Final]:
        """Text chunks, then one ``Final`` (n of each, tagged with ``index``, when ``n`` > 1).
        Raises ``vlm_engine.errors.EngineError``."""
        ...
