"""The language model alone, from input embeddings: what steps that carry prompt chunks run
compiled (``COMPILE_STEP``).

A step with prompt chunks carries image tokens whose embeddings come from the vision encoder.
HF's multimodal forward places them with boolean masks (``masked_scatter``, DeepStack's
``hidden[mask] += …``), whose shapes depend on the data: a compiler cannot keep one graph
for them. So, as vLLM's runner does, the step's embeddings are made outside the graph (token
embeddings, the images' rows put at their tokens) and the graph starts at the decoder
layers. Qwen3-VL's DeepStack features are added by index (``index_add``) instead of by mask.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


class EmbeddedStep(torch.nn.Module):
    """``language_model`` and ``lm_head`` called with ``inputs_embeds``; ``image_index``
    (the flat positions of image tokens) and ``deepstack`` (features per early layer, one
    row per image token) where the model adds DeepStack features."""

    def __init__(self, language_model: Any, lm_head: Any):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        logits_to_keep: torch.Tensor,
        image_index: torch.Tensor | None = None,
        deepstack: list[torch.Tensor] | None = None,
    ) -> CausalLMOutputWithPast:
        extra = {} if deepstack is None else {"visual_pos_masks": image_index, "deepstack_visual_embeds": deepstack}
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **extra,
        )
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state[:, logits_to_keep]))


def embed(model: Any, inputs: dict[str, Any], image_rows: torch.Tensor | None, mask: Any) -> torch.Tensor:
    """The step's token embeddings ``[1, T, hidden]`` with ``image_rows`` (one per image
    token, in order) at the tokens ``mask`` (``[T]``) marks."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    if image_rows is not None:
        embeds[mask[None]] = image_rows.to(embeds.dtype)
    return embeds


def add_deepstack_by_index(text_model: Any) -> None:
    """Qwen3-VL's text model adds DeepStack features by boolean mask; given an index tensor
    (``EmbeddedStep``) it adds them with ``index_add``, which keeps the graph's shapes symbolic.
    A mask (HF's own forward, ``generate``) still goes the original way."""
    by_mask = text_model._deepstack_process

    def process(self: Any, hidden_states: torch.Tensor, positions: torch.Tensor, visual_embeds: torch.Tensor):
        if positions.dtype == torch.bool:
            return by_mask(hidden_states, positions, visual_embeds)
        return hidden_states.index_add(1, positions, visual_embeds.to(hidden_states.dtype)[None])

    text_model._deepstack_process = types.MethodType(process, text_model)
