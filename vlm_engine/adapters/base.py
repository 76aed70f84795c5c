"""What every architecture adapter provides, and the shared HF ``generate`` path."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm_engine.chat import Message
from vlm_engine.params import GenerationParams
from vlm_engine.settings import ModelSettings
from vlm_engine.streaming import BatchTokenStreamer, RowText, StopWhen, run_in_thread


@dataclass
class Prepared:
    """A validated request: decoded images, resolved parameters."""

    messages: list[Message]
    params: GenerationParams
    image: Image.Image | None = None
    cancelled: Callable[[], bool] = lambda: False
    prompt_tokens: int = 0


@dataclass
class Result:
    text: str
    output_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    entities: list[dict[str, Any]] | None = None
    prompt_tokens: int = 0  # text tokens of the conversation (image tokens not counted)


@dataclass
class Chunk:
    """Streaming event: ``text`` for row ``index``; ``result`` is set on its last event."""

    index: int
    text: str
    result: Result | None = None


@dataclass
class _Row:
    prepared: Prepared
    text: RowText
    done: bool = False
    finish_reason: str = "length"
    extra: dict = field(default_factory=dict)


class Adapter(ABC):
    """One architecture: loading, prompt format, batched streaming generation."""

    max_images = 1
    requires_image = False  # a blank image is supplied for text-only chats

    def __init__(self, settings: ModelSettings, device: str):
        self.settings = settings
        self.device = device

    @abstractmethod
    def load(self) -> None:
        """Load weights, tokenizer and processor from ``settings.model_path``."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of user text, for the prompt-length limit."""

    @abstractmethod
    def stream_group(self, group: list[Prepared]) -> Iterator[Chunk]:
        """Generate for requests that share sampling settings; indices are into ``group``."""

    def batch_key(self, prepared: Prepared) -> Hashable:
        """Requests with different keys never share a ``generate`` call."""
        return None


class GenerateAdapter(Adapter):
    """Adapters whose model has a HF ``generate`` (LLaVA, Kosmos-2, Qwen3-VL)."""

    model: Any
    tokenizer: Any

    @abstractmethod
    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        """Left-padded model inputs for the whole group."""

    def visible_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def finish(self, ids: list[int], finish_reason: str) -> Result:
        return Result(self.visible_text(ids), len(ids), finish_reason)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return {e for e in eos if e is not None}

    def stream_group(self, group: list[Prepared]) -> Iterator[Chunk]:
        import torch

        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in self.encode(group).items()}
        for key in ("pixel_values",):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.model.dtype)
        params = group[0].params
        rows = [_Row(p, RowText(self.visible_text)) for p in group]
        streamer = BatchTokenStreamer()
        stop = StopWhen(lambda: all(r.done or r.prepared.cancelled() for r in rows))
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
        )
        pad = self.tokenizer.pad_token_id
        kwargs = dict(
            inputs,
            max_new_tokens=max(p.params.max_tokens for p in group),
            streamer=streamer,
            stopping_criteria=[stop],
            pad_token_id=pad if pad is not None else next(iter(self.eos_ids())),
            **sampling,
        )

        def generate() -> None:
            with torch.inference_mode():
                self.model.generate(**kwargs)

        eos = self.eos_ids()
        thread = run_in_thread(generate, streamer)
        for step in streamer:
            for index, (row, token) in enumerate(zip(rows, step, strict=True)):
                if row.done:
                    continue
                delta = ""
                if row.prepared.cancelled():
                    row.done, row.finish_reason = True, "cancelled"
                elif token in eos:
                    row.done, row.finish_reason = True, "stop"
                else:
                    delta = row.text.push(token)
                    row.done = len(row.text.ids) >= row.prepared.params.max_tokens
                if row.done:
                    yield self._finish_row(index, row, delta)
                elif delta:
                    yield Chunk(index, delta)
        thread.join()
        for index, row in enumerate(rows):
            if not row.done:
                row.done = True
                yield self._finish_row(index, row, "")

    def _finish_row(self, index: int, row: _Row, pending: str) -> Chunk:
        result = self.finish(row.text.ids, row.finish_reason)
        rest = row.text.flush(result.text)
        return Chunk(index, pending + rest, result)
