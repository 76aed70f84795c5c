"""TEST STAND-IN for ``vikhyatk/moondream2``: NOT the real model.

moondream2's real code lives on the Hugging Face hub and is loaded with
``trust_remote_code=True``. This file is copied into the tiny moondream2 checkpoint as
``hf_moondream.py`` so that the same loading code (``AutoModelForCausalLM`` with
``trust_remote_code``) runs offline. It exposes the public API the engine uses:
``encode_image``, ``query(image, question, stream=..., settings=...)`` and
``caption(image, length=..., stream=..., settings=...)``, with ``settings`` keys
``temperature``, ``top_p`` and ``max_tokens``, and streaming as a generator of text chunks.
Its weights are random: its answers are gibberish.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
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
        pixels = (
            torch.tensor(
                list(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)).getdata()),
                dtype=torch.float32,
            )
            .view(IMAGE_SIZE, IMAGE_SIZE, 3)
            .permute(2, 0, 1)
        )
        pixels = (pixels / 127.5 - 1.0).unsqueeze(0).to(self.device, self.dtype)
        patches = self.patch(pixels).flatten(2).transpose(1, 2)
        return EncodedImage(self.proj(patches))

    def query(self, image=None, question=None, reasoning=False, stream=False, settings=None):
        if not question:
            raise ValueError("question must be a non-empty string")
        chunks = self._generate(image, f"\n\nQuestion: {question}\n\nAnswer:", settings or {})
        return {"answer": chunks if stream else "".join(chunks)}

    def caption(self, image, length="normal", stream=False, settings=None):
        if length not in PROMPTS:
            raise ValueError(f"length must be one of {sorted(PROMPTS)}")
        chunks = self._generate(image, PROMPTS[length], settings or {})
        return {"caption": chunks if stream else "".join(chunks)}

    @torch.inference_mode()
    def _generate(self, image, prompt: str, settings: dict) -> Iterator[str]:
        max_tokens = int(settings.get("max_tokens", 768))
        temperature = float(settings.get("temperature", 0.5))
        top_p = float(settings.get("top_p", 0.3))
        tok = self.tokenizer
        ids = torch.tensor([tok.encode(prompt)], device=self.device)
        embeds = self.text.get_input_embeddings()(ids)
        if image is not None:
            embeds = torch.cat([self.encode_image(image).embeddings, embeds], dim=1)
        past, step_input, out_ids, emitted = None, embeds, [], ""
        for _ in range(max_tokens):
            out = self.text(inputs_embeds=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            next_id = _pick(out.logits[0, -1].float(), temperature, top_p)
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
