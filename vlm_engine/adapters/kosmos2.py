"""Kosmos-2 (``Kosmos2ForConditionalGeneration``): grounded captions with entity boxes.

Kosmos-2 numbers positions from ``past length + padding_idx``, so left-padded rows drift
from what they would generate alone; rows are batched only with rows of equal length
(``batch_key``), which matches single requests exactly.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

from vlm_engine.adapters.base import GenerateAdapter, Prepared, Result
from vlm_engine.loading import from_pretrained_kwargs

TAG = re.compile(r"</?(phrase|object|grounding|delimiter_of_multi_objects/)>|<patch_index_\d+>")


class Kosmos2Adapter(GenerateAdapter):
    requires_image = True

    def load(self) -> None:
        from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

        kwargs = from_pretrained_kwargs(self.settings, self.device)
        self.processor = AutoProcessor.from_pretrained(
            self.settings.model_path, revision=kwargs["revision"], cache_dir=kwargs["cache_dir"]
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(self.settings.model_path, **kwargs)

    def prompt(self, prepared: Prepared) -> str:
        """Kosmos-2 continues text: earlier turns become plain text before the prompt."""
        text = " ".join(m.text.strip() for m in prepared.messages if m.text.strip())
        return f"<grounding>{text}"

    def batch_key(self, prepared: Prepared) -> Hashable:
        return self.count_tokens(self.prompt(prepared))

    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        return dict(
            self.processor(
                text=[self.prompt(p) for p in group],
                images=[p.image for p in group],
                padding=True,
                return_tensors="pt",
            )
        )

    def _extract(self, ids: list[int]) -> tuple[str, list[dict[str, Any]]]:
        raw = self.tokenizer.decode(ids, skip_special_tokens=True)
        try:
            caption, entities = self.processor.post_process_generation(raw)
        except Exception:  # random or truncated output may not parse
            return " ".join(TAG.sub(" ", raw).split()), []
        return caption.strip(), [
            {"phrase": phrase, "span": list(span), "boxes": [list(box) for box in boxes]}
            for phrase, span, boxes in entities
        ]

    def visible_text(self, ids: list[int]) -> str:
        return self._extract(ids)[0]

    def finish(self, ids: list[int], finish_reason: str) -> Result:
        text, entities = self._extract(ids)
        return Result(text, len(ids), finish_reason, entities)
