"""TEST STAND-IN for ``vikhyatk/moondream2``: NOT the real model.

moondream2's real code lives on the Hugging Face hub and is loaded with
``trust_remote_code=True``. This file is copied into the tiny moondream2 checkpoint as
``hf_moondream.py`` so that the same loading code (``AutoModelForCausalLM`` with
``trust_remote_code``) runs offline. It exposes the public API the engine uses:
``encode_image``, ``query(image, question, stream=..., settings=...)`` and
``caption(image, length=..., stream=..., settings=...)``, with ``settings`` keys
``temperature``, ``top_p`` and ``max_tokens``, and streaming as a generator of text chunks.
Like the real code, it keeps ONE key/value cache inside the model
(``model.model.text.blocks[i].kv_cache.k_cache`` / ``v_cache``, the whole context long):
``query`` writes the image into it at once, and the returned stream prefills and decodes
into it later, so two streams advanced in turn corrupt each other unless the caller gives
each its own cache. Its weights are random: its answers are gibberish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.cache_utils import DynamicLayer
from transformers.configuration_utils import PretrainedConfig

IMAGE_SIZE = 224
PROMPTS = {
    "short": "\n\nDescribe this image in one sentence.\n\nAnswer:",
    "normal": "\n\nDescribe this image.\n\nAnswer:",
    "long": "\n\nDescribe this image in detail.\n\nAnswer:",
}


class HfConfig(PretrainedConfig):
    """Configuration of the stand-in: a patch encoder and a small Llama decoder."""

    model_type = "moondream1"

    def __init__(self, text_config=None, vision_dim=64, patch_size=28, **kwargs):
        self.text_config = dict(text_config or {})
        self.vision_dim = vision_dim
        self.patch_size = patch_size
        self.initializer_range = self.text_config.get("initializer_range", 0.02)
        super().__init__(**kwargs)


class KVCache(nn.Module):
    """One block's keys and values for the whole context, held by the model."""

    def __init__(self, heads: int, context: int, head_dim: int):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, context, head_dim), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, heads, context, head_dim), persistent=False)


class _Block(nn.Module):
    def __init__(self, heads: int, context: int, head_dim: int):
        super().__init__()
        self.kv_cache = KVCache(heads, context, head_dim)


class _Text(nn.Module):
    def __init__(self, layers: int, heads: int, context: int, head_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(heads, context, head_dim) for _ in range(layers))


class _Inner(nn.Module):
    """Where the real ``MoondreamModel`` keeps its caches: ``.text.blocks[i].kv_cache``."""

    def __init__(self, text_config: dict):
        super().__init__()
        heads = text_config.get("num_key_value_heads", text_config["num_attention_heads"])
        head_dim = text_config["hidden_size"] // text_config["num_attention_heads"]
        context = text_config.get("max_position_embeddings", 2048)
        self.text = _Text(text_config["num_hidden_layers"], heads, context, head_dim)


class _SharedLayer(DynamicLayer):
    """Writes into whichever buffers the model's ``kv_cache`` holds at the time of the call."""

    def __init__(self, kv_cache: KVCache, length: int):
        super().__init__()
        self.kv_cache, self.length = kv_cache, length
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.kv_cache.k_cache.shape[-2]:
            raise IndexError(f"position {end} is past the context of {self.kv_cache.k_cache.shape[-2]}")
        self.kv_cache.k_cache[:, :, self.length : end] = key_states
        self.kv_cache.v_cache[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.kv_cache.k_cache[:, :, :end]
        self.values = self.kv_cache.v_cache[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class EncodedImage:
    """Image embeddings, reusable across questions (like the real ``encode_image``)."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings


class HfMoondream(PreTrainedModel):
    """Random-weight stand-in with moondream2's public inference API."""

    config_class = HfConfig
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: HfConfig):
        super().__init__(config)
        hidden = config.text_config["hidden_size"]
        self.patch = nn.Conv2d(3, config.vision_dim, config.patch_size, config.patch_size)
        self.proj = nn.Linear(config.vision_dim, hidden)
        self.text = LlamaForCausalLM(LlamaConfig(**config.text_config))
        self.model = _Inner(config.text_config)
        self._tokenizer = None
        self.post_init()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(self.config.name_or_path)
        return self._tokenizer

    @torch.inference_mode()
    def encode_image(self, image) -> EncodedImage:
        if isinstance(image, EncodedImage):
            return image
        resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1)
        pixels = (pixels / 127.5 - 1.0).unsqueeze(0).to(self.device, self.dtype)
        patches = self.patch(pixels).flatten(2).transpose(1, 2)
        return EncodedImage(self.proj(patches))

    def query(self, image=None, question=None, reasoning=False, stream=False, settings=None):
        if not question:
            raise ValueError("question must be a non-empty string")
        pos = self._load_image(image)
        chunks = self._generate(pos, f"\n\nQuestion: {question}\n\nAnswer:", settings or {})
        return {"answer": chunks if stream else "".join(chunks)}

    def caption(self, image, length="normal", stream=False, settings=None):
        if length not in PROMPTS:
            raise ValueError(f"length must be one of {sorted(PROMPTS)}")
        pos = self._load_image(image)
        chunks = self._generate(pos, PROMPTS[length], settings or {})
        return {"caption": chunks if stream else "".join(chunks)}

    def _forward(self, embeds: torch.Tensor, pos: int):
        """Run ``embeds`` at positions ``pos…`` through the text model, into the shared cache."""
        cache = DynamicCache(config=self.text.config)
        cache.layers = [_SharedLayer(block.kv_cache, pos) for block in self.model.text.blocks]
        positions = torch.arange(pos, pos + embeds.shape[1], device=self.device)[None]
        return self.text(inputs_embeds=embeds, past_key_values=cache, position_ids=positions, use_cache=True)

    @torch.inference_mode()
    def _load_image(self, image) -> int:
        """Like the real ``query``: the image is encoded into the cache at once; returns its length."""
        if image is None:
            return 0
        embeddings = self.encode_image(image).embeddings
        self._forward(embeddings, 0)
        return embeddings.shape[1]

    @torch.inference_mode()
    def _generate(self, pos: int, prompt: str, settings: dict) -> Iterator[str]:
        max_tokens = int(settings.get("max_tokens", 768))
        temperature = float(settings.get("temperature", 0.5))
        top_p = float(settings.get("top_p", 0.3))
        tok = self.tokenizer
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        step_input = self.text.get_input_embeddings()(ids)
        out_ids, emitted = [], ""
        for _ in range(max_tokens):
            logits = self._forward(step_input, pos).logits
            pos += step_input.shape[1]
            next_id = _pick(logits[0, -1].float(), temperature, top_p)
            if next_id == tok.eos_token_id:
                break
            out_ids.append(next_id)
            text = tok.decode(out_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and text.startswith(emitted) and text != emitted:
                yield text[len(emitted) :]
                emitted = text
            step_input = self.text.get_input_embeddings()(torch.tensor([[next_id]], device=self.device))
        final = tok.decode(out_ids, skip_special_tokens=True)
        if final.startswith(emitted) and final != emitted:
            yield final[len(emitted) :]


def _pick(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1)
    return int(order[choice])
