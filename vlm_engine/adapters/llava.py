"""LLaVA-1.5 (``LlavaForConditionalGeneration``): ``USER: <image>\\n… ASSISTANT:``."""

from __future__ import annotations

from typing import Any

from vlm_engine.adapters.base import GenerateAdapter, Prepared
from vlm_engine.loading import from_pretrained_kwargs, source_kwargs


class LlavaAdapter(GenerateAdapter):
    multi_image = True  # each image is a <image> in its turn (the processor expands each)

    def load_processor(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.settings.model_path, **source_kwargs(self.settings))
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"

    def load_model(self) -> None:
        from transformers import LlavaForConditionalGeneration

        kwargs = from_pretrained_kwargs(self.settings, self.device)
        self.model = LlavaForConditionalGeneration.from_pretrained(self.settings.model_path, **kwargs)

    def chunk_module(self) -> Any:
        from vlm_engine.adapters.embedded import EmbeddedStep

        return EmbeddedStep(self.model.model.language_model, self.model.lm_head)

    def estimate_image_tokens(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def prompt(self, prepared: Prepared) -> str:
        """llava-1.5's conversation format; system text leads, the image goes in its turn."""
        parts = []
        for message in prepared.messages:
            if message.role == "system":
                parts.append(message.text.strip())
            elif message.role == "user":
                image = "<image>\n" * len(message.decoded)
                parts.append(f"USER: {image}{message.text.strip()}")
            else:
                parts.append(f"ASSISTANT: {message.text.strip()}{self.tokenizer.eos_token}")
        return " ".join(p for p in parts if p) + " ASSISTANT:"

    def encode_images(self, pixels: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        config = self.model.config
        out = self.model.model.get_image_features(
            self.pixel_batch(pixels)["pixel_values"].to(self.device, self.model.dtype),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        return [(features,) for features in out.pooler_output]

    def image_inputs(self, pieces: list[tuple[Any, ...]]) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[p[0] for p in pieces])}}

    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        images = [image for p in group for image in p.images]
        return dict(
            self.processor(
                images=images or None,
                text=[self.prompt_text(p) for p in group],
                padding=True,
                return_tensors="pt",
            )
        )
