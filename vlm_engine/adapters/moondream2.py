"""moondream2 through ``trust_remote_code`` and its own ``query`` / ``caption`` API.

moondream2 has no batched generation API: requests in a batch stream side by side, one
token of each in turn, and share one Triton execution. Output token counts are the
number of streamed chunks (its API reports none). ``/caption`` (optionally
``/caption short|normal|long``) as the prompt asks for a caption instead of an answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from vlm_engine.adapters.base import Adapter, Chunk, Prepared, Result
from vlm_engine.loading import from_pretrained_kwargs

CAPTION = "/caption"


class Moondream2Adapter(Adapter):
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

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

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

    def stream_group(self, group: list[Prepared]) -> Iterator[Chunk]:
        live = {i: self._chunks(p) for i, p in enumerate(group)}
        texts = {i: [] for i in live}
        while live:
            for index in list(live):
                prepared = group[index]
                chunk = None if prepared.cancelled() else next(live[index], None)
                if chunk is not None:
                    texts[index].append(chunk)
                    yield Chunk(index, chunk)
                    continue
                del live[index]
                text = "".join(texts[index])
                tokens = len(texts[index])  # the API reports no token counts; a chunk is about one
                reason = (
                    "cancelled"
                    if prepared.cancelled()
                    else ("length" if tokens >= prepared.params.max_tokens else "stop")
                )
                yield Chunk(index, "", Result(text, tokens, reason))
