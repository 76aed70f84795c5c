"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) with its chat template.

Qwen3-VL rotates by M-RoPE: three position rows (time, height, width) that differ inside
an image. The model keeps ``rope_deltas`` as module state from its last prefill, which is
wrong for rows that joined at other times, so the engine passes ``[4, rows, length]``
positions itself (text positions, then the three M-RoPE rows) and keeps each row's next
M-RoPE position in the batch state.

``Qwen3VLProcessor`` needs torchvision (for videos), so the tokenizer and the image
processor are loaded separately and the processor's image step is done here: each
``<|image_pad|>`` is expanded to ``grid_t*grid_h*grid_w / merge_size**2`` copies.

Encoded images (merged embeddings and DeepStack features) come from the engine's encoder
cache by content hash and are given back to the model as ``mm_encoder_outputs``, sliced to
the image tokens of each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm_engine.adapters.base import PROMPT_POSITIONS, GenerateAdapter, Prepared, Sequence
from vlm_engine.loading import from_pretrained_kwargs, source_kwargs

IMAGE_PAD = "<|image_pad|>"


@dataclass
class EncodedImages:
    """The vision tower's output for some images, as Qwen3-VL's forward takes it back
    (``mm_encoder_outputs``): merged embeddings and DeepStack features, one tensor per image."""

    pooler_output: tuple[Any, ...]
    deepstack_features: list[tuple[Any, ...]]


def patch_embedding_as_product(embed: Any) -> None:
    """The vision tower's patch embedding is a ``Conv3d`` whose kernel is its stride, over
    inputs exactly one kernel large: one matrix product of each flattened patch with the
    flattened kernel (as vLLM computes it). Measured on this machine for one image's 36
    patches: 684 µs through ``Conv3d``, 99 µs as the product; equal to float rounding."""
    import torch.nn.functional as F

    proj = embed.proj

    def forward(hidden_states: Any) -> Any:
        weight = proj.weight  # read per call: ``model.to(device)`` replaces it after loading
        flat = weight.reshape(weight.shape[0], -1)
        return F.linear(hidden_states.reshape(-1, flat.shape[1]).to(weight.dtype), flat, proj.bias)

    embed.forward = forward


class Qwen3VLAdapter(GenerateAdapter):
    multi_image = True  # the chat template's image parts, each expanded to its own grid
    tool_format = "hermes"  # tools in the system turn, calls in <tool_call> tags (vlm_engine.tools)
    position_rows = 4  # text, then M-RoPE's temporal, height and width

    def load_processor(self) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        source = source_kwargs(self.settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.settings.model_path, **source)
        self.tokenizer.padding_side = "left"
        self.image_processor = AutoImageProcessor.from_pretrained(self.settings.model_path, **source)
        self._cap_image_tokens()
        self.model_config = AutoConfig.from_pretrained(self.settings.model_path, **source)
        self.image_token_id = self.model_config.image_token_id

    def load_model(self) -> None:
        from transformers import Qwen3VLForConditionalGeneration

        kwargs = from_pretrained_kwargs(self.settings, self.device)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(self.settings.model_path, **kwargs)
        patch_embedding_as_product(self.model.model.visual.patch_embed)
        from vlm_engine.adapters.embedded import add_deepstack_by_index

        add_deepstack_by_index(self.model.model.language_model)

    def chunk_module(self) -> Any:
        from vlm_engine.adapters.embedded import EmbeddedStep

        return EmbeddedStep(self.model.model.language_model, self.model.lm_head)

    def embed_step(self, inputs: dict[str, Any], pieces: list[tuple[Any, ...]], decodes: int) -> dict[str, Any]:
        """DeepStack's features go in by index beside the embeddings (``adapters.embedded``)."""
        import torch

        out = super().embed_step(inputs, pieces, decodes)
        if pieces:
            out["image_index"] = self.step_image_mask(inputs, decodes).nonzero()[:, 0]
            layers = len(pieces[0]) - 1
            out["deepstack"] = [torch.cat([piece[1 + layer] for piece in pieces]) for layer in range(layers)]
        return out

    def _cap_image_tokens(self) -> None:
        """``MAX_IMAGE_TOKENS``: larger images are scaled down by the processor (its
        ``longest_edge`` is a pixel count), so one image cannot take the whole KV budget."""
        patch = self.image_processor.patch_size * self.image_processor.merge_size
        size = self.image_processor.size
        cap = self.settings.max_image_tokens * patch**2
        size.longest_edge = min(size.longest_edge or cap, cap)
        if size.shortest_edge and size.shortest_edge > size.longest_edge:
            size.shortest_edge = size.longest_edge

    def image_pixels(self, seq: Sequence, index: int) -> dict[str, Any]:
        """Image ``index``'s patches (the processor flattens every image's patches into one
        tensor) and its grid."""
        grids = seq.images["image_grid_thw"]
        first = int(grids[:index].prod(-1).sum())
        count = int(grids[index].prod())
        return {
            "pixel_values": seq.images["pixel_values"][first : first + count],
            "image_grid_thw": grids[index : index + 1],
        }

    def encode_images(self, pixels: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """One vision forward over every image's patches (its attention stays within each image)."""
        batch = self.pixel_batch(pixels)
        out = self.model.model.get_image_features(
            batch["pixel_values"].to(self.device, self.model.dtype),
            batch["image_grid_thw"].to(self.device),
            return_dict=True,
        )
        layers = out.deepstack_features
        return [(embeds, *(layer[i] for layer in layers)) for i, embeds in enumerate(out.pooler_output)]

    def image_inputs(self, pieces: list[tuple[Any, ...]]) -> dict[str, Any]:
        """Given back as ``mm_encoder_outputs``: merged embeddings and DeepStack features."""
        layers = len(pieces[0]) - 1
        encoded = EncodedImages(
            tuple(p[0] for p in pieces), [tuple(p[1 + layer] for p in pieces) for layer in range(layers)]
        )
        return {"mm_encoder_outputs": {"image": encoded}}

    def max_image_tokens(self) -> int:
        return self.settings.max_image_tokens

    def prefill_cost(self, prepared: Prepared) -> int:
        if prepared.inputs is not None and "input_ids" in prepared.inputs:
            return int(prepared.inputs["input_ids"].shape[-1])
        patch = self.image_processor.patch_size * self.image_processor.merge_size
        cap = self.settings.max_image_tokens
        return prepared.prompt_tokens + sum(min(max(i.width * i.height // patch**2, 4), cap) for i in prepared.images)

    def prompt(self, prepared: Prepared) -> str:
        messages = []
        for message in prepared.messages:
            content: list[dict] = [{"type": "image"} for _ in message.decoded]
            content.append({"type": "text", "text": message.text})
            turn: dict[str, Any] = {"role": message.role, "content": content}
            if message.tool_calls:
                turn["tool_calls"] = message.tool_calls
            messages.append(turn)
        return self.tokenizer.apply_chat_template(
            messages, tools=prepared.tools, add_generation_prompt=True, tokenize=False
        )

    def encode(self, group: list[Prepared]) -> dict[str, Any]:
        texts = [self.prompt_text(p) for p in group]
        images = [image for p in group for image in p.images]
        extra: dict[str, Any] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size**2
            counts = iter((vision["image_grid_thw"].prod(-1) // merge).tolist())
            texts = [self._expand(text, counts) for text in texts]
            extra = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        encoded["mm_token_type_ids"] = (encoded["input_ids"] == self.image_token_id).int()
        return {**encoded, **extra}

    @staticmethod
    def _expand(text: str, counts) -> str:
        pieces = text.split(IMAGE_PAD)
        out = pieces[0]
        for piece in pieces[1:]:
            out += "<|placeholder|>" * next(counts) + piece
        return out.replace("<|placeholder|>", IMAGE_PAD)

    def encode_row(self, prepared: Prepared) -> dict[str, Any]:
        """The processor's inputs and the prompt's positions (``PROMPT_POSITIONS``): M-RoPE's
        index walks the prompt in Python, which is better done here than in the step loop."""
        inputs = super().encode_row(prepared)
        inputs[PROMPT_POSITIONS] = self.sequence_positions(inputs)[0]
        return inputs

    def sequence_positions(self, inputs: dict[str, Any]) -> tuple[Any, int, int | None]:
        import torch

        length = int(inputs["input_ids"].shape[-1])
        text = torch.arange(length)
        if "image_grid_thw" in inputs:
            mrope = self._rope_index(inputs)[:, 0].to(text.device)
        else:
            mrope = text[None].expand(3, -1)
        return torch.cat([text[None], mrope]), length, int(mrope.max()) + 1 if length else 0

    def positions_made(self, positions: Any) -> tuple[Any, int, int | None]:
        length = int(positions.shape[-1])
        return positions, length, int(positions[1:].max()) + 1 if length else 0

    def _rope_index(self, inputs: dict[str, Any]) -> Any:
        """HF's M-RoPE index (``Qwen3VLModel.get_rope_index``), without the model: it reads
        only the config and a static helper, so an input worker (processor only) runs it too."""
        from functools import partial
        from types import SimpleNamespace

        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        helper = partial(Qwen3VLModel.get_vision_position_ids, None)
        owner = SimpleNamespace(config=self.model_config, get_vision_position_ids=helper)
        positions, _ = Qwen3VLModel.get_rope_index(
            owner,
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return positions

    def next_positions(self, seq: Sequence) -> list[int]:
        mrope = seq.next_mrope + seq.cached - seq.length
        return [seq.next_position + seq.cached - seq.length, mrope, mrope, mrope]
