"""Kosmos-2 (``Kosmos2ForConditionalGeneration``): grounded captions with entity boxes.

Kosmos-2 numbers positions from ``past length + padding_idx``, so left padding would shift
a row's positions in a merged batch. The engine passes positions itself: the ``k``-th real
token of a row is at ``padding_idx + k`` whatever the padding. Decoding goes through the
text model alone (the top-level forward would rerun the vision tower).
"""

from __future__ import annotations

import re
from typing import Any

from vlm_engine.adapters.base import GenerateAdapter, Prepared, Result
from vlm_engine.loading import from_pretrained_kwargs

TAG = re.compile(r"</?(phrase|object|grounding|delimiter_of_multi_objects/)>|<patch_index_\d+>")


class Kosmos2Adapter(GenerateAdapter):
    requires_image = True
    grounding = True

    def load(self) -> None:
        from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

        kwargs = from_pretrained_kwargs(self.settings, self.device)
        self.processor = AutoProcessor.from_pretrained(
            self.settings.model_path, revision=kwargs["revision"], cache_dir=kwargs["cache_dir"]
        )
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(self.settings.model_path, **kwargs)
        self.padding_idx = self.model.text_model.model.embed_positions.padding_idx
        self.after_load()

    def estimate_image_tokens(self) -> int:
        return self.model.config.latent_query_num

    def prompt(self, prepared: Prepared) -> str:
        """Kosmos-2 continues text: earlier turns become plain text before the prompt."""
        text = " ".join(m.text.strip() for m in prepared.messages if m.text.strip())
        return f"<grounding>{text}"

    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        return dict(
            self.processor(
                text=[self.prompt(p) for p in group],
                images=[p.image for p in group],
                padding=True,
                return_tensors="pt",
            )
        )

    def sequence_positions(self, inputs: dict[str, Any]) -> tuple[Any, int, int | None]:
        import torch

        length = int(inputs["input_ids"].shape[-1])
        return torch.arange(1, length + 1) + self.padding_idx, length + 1 + self.padding_idx, None

    def text_only(self, inputs: dict[str, Any]) -> dict[str, Any]:
        inputs.pop("image_embeds_position_mask", None)
        return inputs

    def forward_prefill(self, inputs: dict[str, Any], positions: Any, cache: Any) -> Any:
        if "pixel_values" in inputs:
            return super().forward_prefill(inputs, positions, cache)
        return self.model.text_model(  # a chunk after the image: the text model alone
            **inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
        )

    def decoder_model(self) -> Any:
        return self.model.text_model  # the top-level forward would rerun the vision tower

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
