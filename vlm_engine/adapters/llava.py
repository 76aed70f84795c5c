"""LLaVA-1.5 (``LlavaForConditionalGeneration``): ``USER: <image>\\n… ASSISTANT:``."""

from __future__ import annotations

from typing import Any

from vlm_engine.adapters.base import GenerateAdapter, Prepared, pixels_key
from vlm_engine.images import PixelCache
from vlm_engine.loading import from_pretrained_kwargs, source_kwargs


class LlavaAdapter(GenerateAdapter):
    multi_image = True  # each image is a <image> in its turn (the processor expands each)

    def load_processor(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.settings.model_path, **source_kwargs(self.settings))
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.pixels = PixelCache()

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
        """The processor's inputs, as ``self.processor`` makes them (a test compares them), with
        each image's pixels from ``self.pixels`` when the same image came before."""
        texts = [self.prompt_text(p) for p in group]
        images = [image for p in group for image in p.images]
        processor = self.processor
        if not images or sum(text.count(processor.image_token) for text in texts) != len(images):
            # no image, or not one <image> per image (a raw prompt's own): the processor says what is wrong
            return dict(processor(images=images or None, text=texts, padding=True, return_tensors="pt"))
        keys = [key for p in group for key in (p.image_keys or [pixels_key(image) for image in p.images])]
        pixels = self.pixels.pixel_values(
            images, keys, lambda fresh: processor.image_processor(fresh, return_tensors="pt")["pixel_values"]
        )
        count = iter(range(len(images)))
        expanded = []
        for text in texts:  # each <image> becomes its tokens, as the processor writes them
            first, *rest = text.split(processor.image_token)
            expanded.append(
                first + "".join(processor.replace_image_token({"pixel_values": pixels}, next(count)) + r for r in rest)
            )
        return {**self.tokenizer(expanded, padding=True, return_tensors="pt"), "pixel_values": pixels}
