"""moondream2 through ``trust_remote_code`` and its own ``query`` / ``caption`` API.

moondream2's API generates one request at a time, so its rows are not computed as one
tensor batch: each row is a stream from ``query``/``caption``, and every scheduler step
advances each running row by one chunk, so requests join and leave at chunk boundaries.
Its API reports no token counts: a chunk counts as one token. ``/caption`` (optionally
``/caption short|normal|long``) as the prompt asks for a caption instead of an answer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from vlm_engine.adapters.base import Adapter, Prepared, Result, RowDecoder, RowStep
from vlm_engine.loading import from_pretrained_kwargs

CAPTION = "/caption"
_END = object()


class ChunkDecoder(RowDecoder):
    def __init__(self) -> None:
        self.chunks: list[str] = []

    def push(self, output: Any) -> RowStep:
        if output is _END:
            return RowStep(tokens=0, stop=True)
        if isinstance(output, BaseException):
            raise output
        self.chunks.append(output)
        return RowStep(output)

    def finish(self, finish_reason: str) -> tuple[str, Result]:
        return "", Result("".join(self.chunks), len(self.chunks), finish_reason)


class Moondream2Adapter(Adapter):
    image_tokens = 730

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = from_pretrained_kwargs(self.settings, self.device, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.settings.model_path, **kwargs)
        if "device_map" not in kwargs:
            self.model.to(self.device)
        self.model.eval()
        self.tokenizer = getattr(self.model, "tokenizer", None) or AutoTokenizer.from_pretrained(
            self.settings.model_path,
            revision=kwargs["revision"],
            cache_dir=kwargs["cache_dir"],
            trust_remote_code=True,
        )
        self._counter = copy.deepcopy(self.tokenizer)

    def count_tokens(self, text: str) -> int:
        with self._count_lock:
            return len(self._counter.encode(text))

    def question(self, prepared: Prepared) -> str:
        """Earlier turns are given to ``query`` as context before the question."""
        *history, last = prepared.messages
        context = "\n".join(f"{m.role}: {m.text.strip()}" for m in history if m.text.strip())
        return f"{context}\n{last.text.strip()}" if context else last.text.strip()

    def _chunks(self, prepared: Prepared) -> Iterator[str]:
        params = prepared.params
        settings = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
        question = self.question(prepared)
        if question.startswith(CAPTION):
            length = question[len(CAPTION) :].strip() or "normal"
            return self.model.caption(prepared.image, length=length, stream=True, settings=settings)["caption"]
        return self.model.query(prepared.image, question, stream=True, settings=settings)["answer"]

    def decoder(self, prepared: Prepared) -> RowDecoder:
        return ChunkDecoder()

    @staticmethod
    def _next(stream: Iterator[str]) -> Any:
        try:
            return next(stream, _END)
        except Exception as exc:  # this row's error only
            return exc

    def prefill(self, group: list[Prepared]) -> tuple[list[Iterator[str]], list[Any]]:
        streams = [self._chunks(p) for p in group]
        return streams, [self._next(s) for s in streams]

    def decode(self, state: list[Iterator[str]]) -> list[Any]:
        return [self._next(s) for s in state]

    def merge(self, a: list, b: list) -> list:
        return a + b

    def select(self, state: list, keep: list[int]) -> list:
        return [state[i] for i in keep]
