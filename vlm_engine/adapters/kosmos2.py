"""Kosmos-2 (``Kosmos2ForConditionalGeneration``): grounded captions with entity boxes.

Kosmos-2 numbers positions from ``past length + padding_idx``, so left padding would shift
a row's positions in a merged batch. The engine passes positions itself: the ``k``-th real
token of a row is at ``padding_idx + k`` whatever the padding. Forwards go through the text
model alone, given the image's embeddings (the encoder's output, sliced per chunk).

The answer is the generated text with every ``<...>`` field (``<phrase>``, ``<object>``,
``<patch_index_N>``) removed, as transformers' ``clean_text_and_extract_entities_with_bboxes``
removes them; ``CaptionStreamText`` streams that same text as it grows.
"""

from __future__ import annotations

import re
from typing import Any

from vlm_engine.adapters.base import GenerateAdapter, Prepared
from vlm_engine.loading import from_pretrained_kwargs, source_kwargs
from vlm_engine.output import Result, StreamText

FIELD = re.compile("<.*?>")  # what transformers removes from a Kosmos-2 caption


class CaptionStreamText(StreamText):
    """Kosmos-2's caption as it grows: ``<...>`` fields removed as the final answer removes
    them, and text from a ``<`` that a later ``>`` could still close held back, so what is
    sent is always a prefix of the answer."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer)
        self.raw = ""  # decoded text not settled yet: it starts at a '<' that may still close

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.raw += self.stream.step(self.tokenizer, token) or ""
        cut = open_field_start(self.raw)
        piece, self.raw = FIELD.sub("", self.raw[:cut]), self.raw[cut:]
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.held + piece
        body = text.rstrip()
        if not body:
            self.held = text
            return ""
        self.held = text[len(body) :]
        self.emitted_chars += len(body)
        self.sent += body
        return body


def open_field_start(text: str) -> int:
    """Where the first ``<`` that a later ``>`` could still close begins (``len(text)`` if none):
    the first ``<`` after the last ``>`` or newline (``.`` in ``FIELD`` stops at a newline)."""
    settled = max(text.rfind(">"), text.rfind("\n")) + 1
    start = text.find("<", settled)
    return len(text) if start < 0 else start


class Kosmos2Adapter(GenerateAdapter):
    requires_image = True
    grounding = True

    def load_processor(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.settings.model_path, **source_kwargs(self.settings))
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"

    def load_model(self) -> None:
        from transformers import Kosmos2ForConditionalGeneration

        kwargs = from_pretrained_kwargs(self.settings, self.device)
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(self.settings.model_path, **kwargs)
        self.padding_idx = self.model.text_model.model.embed_positions.padding_idx

    def estimate_image_tokens(self) -> int:
        return self.model.config.latent_query_num

    def prompt(self, prepared: Prepared) -> str:
        """Kosmos-2 continues text: earlier turns become plain text before the prompt."""
        text = " ".join(m.text.strip() for m in prepared.messages if m.text.strip())
        return f"<grounding>{text}"

    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        return dict(
            self.processor(
                text=[self.prompt_text(p) for p in group],
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

    def encode_images(self, pixels: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """As ``Kosmos2ForConditionalGeneration.forward`` makes ``image_embeds``: the vision
        model's last hidden state, its post-layernorm, normalized, then the image-to-text
        projection (64 latent queries)."""
        import torch.nn.functional as F

        batch = self.pixel_batch(pixels)["pixel_values"].to(self.device, self.model.dtype)
        hidden = self.model.vision_model(pixel_values=batch)[0]
        embeds = F.normalize(self.model.vision_model.model.post_layernorm(hidden), dim=-1)
        return [(projected,) for projected in self.model.image_to_text_projection(embeds)[0]]

    def image_inputs(self, pieces: list[tuple[Any, ...]]) -> dict[str, Any]:
        import torch

        return {"image_embeds": torch.cat([p[0] for p in pieces])[None]}

    def forward_module(self) -> Any:
        """The text model alone: image tokens take ``image_embeds`` (the top-level forward
        would run the vision tower again)."""
        return self.model.text_model

    def stream_text(self) -> StreamText:
        return CaptionStreamText(self.tokenizer._tokenizer)

    def _extract(self, ids: list[int]) -> tuple[str, list[dict[str, Any]]]:
        """The caption and its entities. ``ids`` are the generated tokens alone, so the
        processor's split at ``</image>`` (meant for prompt + answer) is not applied."""
        from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

        raw = self.tokenizer._tokenizer.decode(ids, skip_special_tokens=True)  # as the stream decodes
        try:
            caption, entities = clean_text_and_extract_entities_with_bboxes(raw)
        except Exception:  # random or truncated output may not parse: the caption, no entities
            return FIELD.sub("", raw).strip(), []
        return caption.strip(), [
            {"phrase": phrase, "span": list(span), "boxes": [list(box) for box in boxes]}
            for phrase, span, boxes in entities
        ]

    def visible_text(self, ids: list[int]) -> str:
        return self._extract(ids)[0]

    def finish(self, ids: list[int], finish_reason: str) -> Result:
        text, entities = self._extract(ids)
        return Result(text, len(ids), finish_reason, entities)
