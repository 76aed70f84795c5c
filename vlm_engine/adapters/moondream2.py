"""moondream2 through ``trust_remote_code`` and its own ``query`` / ``caption`` API.

moondream2's API generates one request at a time, so its rows are not computed as one
tensor batch: each row is a stream from ``query``/``caption``, and every scheduler step
advances each running row by one chunk, so requests join and leave at chunk boundaries.

The real code keeps one key/value cache inside the model (``model.model.text.blocks[i]
.kv_cache``, buffers ``k_cache``/``v_cache`` the whole context long): ``query`` writes the
image into it and the stream decodes into it later. Each row therefore gets caches of its
own, bound into the model before its ``query`` and before each of its steps (rebinding a
buffer costs nothing; each row's cache costs its memory: about 384 MiB for the real 2B
model, hence its smaller ``max_running``).
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


class _Row:
    """One request's stream and the cache buffers it owns."""

    def __init__(self, caches: list[tuple[Any, Any]] | None):
        self.caches = caches
        self.stream: Iterator[str] | None = None


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

    def _cache_modules(self) -> list[Any]:
        """The model's per-block ``kv_cache`` modules, where its code keeps them (else none)."""
        blocks = getattr(getattr(getattr(self.model, "model", None), "text", None), "blocks", None) or []
        return [block.kv_cache for block in blocks if hasattr(block, "kv_cache")]

    def _bind(self, row: _Row) -> None:
        for module, (keys, values) in zip(self._cache_modules(), row.caches or [], strict=False):
            module.k_cache, module.v_cache = keys, values

    def _start(self, prepared: Prepared) -> _Row:
        import torch

        modules = self._cache_modules()
        row = _Row([(torch.zeros_like(m.k_cache), torch.zeros_like(m.v_cache)) for m in modules] or None)
        self._bind(row)
        row.stream = self._chunks(prepared)
        if row.caches is None and self._cache_modules():  # the model made its caches just now
            row.caches = [(m.k_cache, m.v_cache) for m in self._cache_modules()]
        return row

    def _next(self, row: _Row) -> Any:
        self._bind(row)
        try:
            return next(row.stream, _END)
        except Exception as exc:  # this row's error only
            return exc

    def prefill(self, group: list[Prepared]) -> tuple[list[_Row], list[Any]]:
        rows = [self._start(p) for p in group]
        return rows, [self._next(row) for row in rows]

    def decode(self, state: list[_Row]) -> list[Any]:
        return [self._next(row) for row in state]

    def merge(self, a: list, b: list) -> list:
        return a + b

    def select(self, state: list, keep: list[int]) -> list:
        return [state[i] for i in keep]
