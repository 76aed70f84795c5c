"""TEST STAND-IN for ``vikhyatk/moondream2`` (revision 2025-06-21): NOT the real model.

moondream2's real code lives on the Hugging Face hub (from ``vikhyat/moondream``,
``moondream/torch/``, June 2025) and is loaded with ``trust_remote_code=True``. This file
is copied into the tiny moondream2 checkpoint as ``hf_moondream.py`` so that the same
loading code runs offline. Its weights are random: its answers are gibberish.

It is the project's own code, written to behave like the real code wherever the engine
depends on it, including the real code's traps (the adapter must cope with all of them):

- ``HfMoondream`` never calls ``post_init()``: under transformers 5 a plain
  ``from_pretrained`` fails with ``AttributeError: ... all_tied_weights_keys``.
- ``attn_mask`` (causal, the image prefix attending both ways) and ``text.freqs_cis`` (the
  rotary table) are non-persistent buffers computed in ``__init__`` and never saved, so
  they come back uninitialised from transformers 5's ``from_pretrained``.
- Weights are built in bfloat16 whatever dtype the caller asks for, and image crops are
  prepared in bfloat16 too: weights cast to another dtype fail in the vision encoder.
- The tokenizer is ``model.model.tokenizer``, a ``tokenizers.Tokenizer`` fetched at
  construction with ``Tokenizer.from_pretrained("moondream/starmie-v1")`` (latest
  revision, default HF cache): no ``.tokenizer`` on the outer model.
- ``encode_image(image, settings)`` reads ``settings["variant"]`` (KeyError without it) and
  returns an ``EncodedImage(pos, caches)`` that later calls reuse.
- ONE key/value cache lives inside the model, ``model.text.blocks[i].kv_cache`` with
  ``k_cache``/``v_cache`` the whole context long, created by the first API call; a query
  without an image replaces them. ``query``/``caption`` write the image into it at once;
  the returned stream prefills the prompt at its first step and decodes into it later, so
  streams advanced in turn corrupt each other unless the caller gives each its own cache.
- Streams yield text per word (up to the last space, a newline or a CJK character), not
  per token, and report no token counts.
- The context is ``max_context`` positions (2048 in the real model, about 730 of them per
  image); past it a stream raises IndexError in the middle of its answer.
- ``query`` appends its template's suffix twice (the real code does), so its prompt is one
  position longer than the template suggests.
- ``caption`` without an image or with an unknown length raises ValueError.
- ``detect(image, object)`` gives ``{"objects": [{x_min, y_min, x_max, y_max}]}`` and
  ``point`` gives ``{"points": [{x, y}]}``, coordinates in 0..1 (boxes may cross the
  edges), decoded by region heads until end of text or ``max_objects``.

Differences that do not matter to the engine: one image crop instead of the real tiling,
a one-layer vision encoder, and ``HfConfig`` keeps the tiny sizes it is given (the real one
always uses the full-size defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel

TOKENIZER_REPO = "moondream/starmie-v1"
DEFAULT_MAX_TOKENS = 768
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.3
DEFAULT_MAX_OBJECTS = 50
WEIGHT_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TextConfig:
    dim: int = 128
    ff_dim: int = 256
    n_layers: int = 2
    vocab_size: int = 1000
    max_context: int = 512
    n_heads: int = 4
    n_kv_heads: int = 4


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 64
    enc_patch_size: int = 14
    crop_size: int = 112


@dataclass(frozen=True)
class RegionConfig:
    coord_feat_dim: int = 32
    coord_bins: int = 64
    size_feat_dim: int = 32
    size_bins: int = 64


@dataclass(frozen=True)
class TokenizerConfig:
    bos_id: int = 0
    eos_id: int = 0
    answer_id: int = 3
    coord_id: int = 5
    size_id: int = 6
    templates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MoondreamConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    region: RegionConfig = RegionConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()

    @classmethod
    def from_dict(cls, values: dict) -> MoondreamConfig:
        return cls(
            TextConfig(**values.get("text", {})),
            VisionConfig(**values.get("vision", {})),
            RegionConfig(**values.get("region", {})),
            TokenizerConfig(**values.get("tokenizer", {})),
        )


@dataclass(frozen=True)
class EncodedImage:
    """An image run through the vision encoder and the text model: reusable across calls."""

    pos: int
    caches: list[tuple[torch.Tensor, torch.Tensor]]


def rotary_table(pairs: int, length: int) -> torch.Tensor:
    """``[length, pairs, 2]`` cosines and sines of the usual rotary frequencies (base 10000)."""
    inverse = torch.pow(10000.0, -torch.arange(pairs, dtype=torch.float32) / pairs)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rotate(x: torch.Tensor, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``2 * pairs`` features (halves, not interleaved).

    Indexing the table with a position past the context raises IndexError, as the real one."""
    pairs = table.shape[1]
    cos, sin = table[positions, :, 0], table[positions, :, 1]  # [T, pairs]
    first, second, rest = x[..., :pairs], x[..., pairs : 2 * pairs], x[..., 2 * pairs :]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos, rest], dim=-1)


class KVCache(nn.Module):
    """One block's keys and values for the whole context, held by the model."""

    def __init__(self, kv_heads: int, context: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (1, kv_heads, context, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype))

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache[:, :, positions] = k
        self.v_cache[:, :, positions] = v
        return self.k_cache, self.v_cache


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, dtype=WEIGHT_DTYPE)


def _text_model(c: TextConfig) -> nn.Module:
    head_dim = c.dim // c.n_heads
    blocks = nn.ModuleList(
        nn.ModuleDict(
            {
                "ln": nn.LayerNorm(c.dim, dtype=WEIGHT_DTYPE),
                "attn": nn.ModuleDict(
                    {"qkv": _linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * head_dim), "proj": _linear(c.dim, c.dim)}
                ),
                "mlp": nn.ModuleDict({"fc1": _linear(c.dim, c.ff_dim), "fc2": _linear(c.ff_dim, c.dim)}),
            }
        )
        for _ in range(c.n_layers)
    )
    text = nn.ModuleDict({"blocks": blocks, "post_ln": nn.LayerNorm(c.dim, dtype=WEIGHT_DTYPE)})
    text.lm_head = _linear(c.dim, c.vocab_size)
    text.wte = nn.Parameter(torch.empty(c.vocab_size, c.dim, dtype=WEIGHT_DTYPE))
    text.register_buffer("freqs_cis", rotary_table(head_dim // 4, c.max_context), persistent=False)
    return text


def _fourier(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    angles = 2 * math.pi * x @ w
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x2F800 <= cp <= 0x2FA1F


class MoondreamModel(nn.Module):
    """Where the real code's inference lives: vision, text, region heads, one KV cache."""

    def __init__(self, config: MoondreamConfig, setup_caches: bool = True):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer.from_pretrained(TOKENIZER_REPO)
        v, t, r = config.vision, config.text, config.region
        side = v.crop_size // v.enc_patch_size
        self.vision = nn.ModuleDict(
            {"patch_emb": _linear(3 * v.enc_patch_size**2, v.enc_dim), "proj": _linear(v.enc_dim, t.dim)}
        )
        self.vision.pos_emb = nn.Parameter(torch.empty(1, side * side, v.enc_dim, dtype=WEIGHT_DTYPE))
        self.text = _text_model(t)
        self.region = nn.ModuleDict(
            {
                "coord_encoder": _linear(r.coord_feat_dim, t.dim),
                "coord_decoder": _linear(t.dim, r.coord_bins),
                "size_encoder": _linear(r.size_feat_dim, t.dim),
                "size_decoder": _linear(t.dim, 2 * r.size_bins),
            }
        )
        self.region.coord_features = nn.Parameter(torch.empty(1, r.coord_feat_dim // 2, dtype=WEIGHT_DTYPE))
        self.region.size_features = nn.Parameter(torch.empty(2, r.size_feat_dim // 2, dtype=WEIGHT_DTYPE))
        prefix = 1 + side * side
        mask = torch.ones(1, 1, t.max_context, t.max_context, dtype=torch.bool).tril()
        mask[..., :prefix, :prefix] = True
        self.register_buffer("attn_mask", mask, persistent=False)
        if setup_caches:
            self._setup_caches()

    @property
    def device(self) -> torch.device:
        return self.vision.pos_emb.device

    def _setup_caches(self) -> None:
        c = self.config.text
        for block in self.text.blocks:
            block.kv_cache = KVCache(
                c.n_kv_heads, c.max_context, c.dim // c.n_heads, self.device, self.vision.pos_emb.dtype
            )

    # -- the network

    def _decoder(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = self.config.text
        head_dim = c.dim // c.n_heads
        batch, length, _ = x.shape
        for block in self.text.blocks:
            h = F.layer_norm(x, (c.dim,), block.ln.weight, block.ln.bias)
            q, k, v = block.attn.qkv(h).split([c.n_heads * head_dim, *[c.n_kv_heads * head_dim] * 2], -1)
            q = rotate(q.view(batch, length, c.n_heads, head_dim).transpose(1, 2), self.text.freqs_cis, positions)
            k = rotate(k.view(batch, length, c.n_kv_heads, head_dim).transpose(1, 2), self.text.freqs_cis, positions)
            v = v.view(batch, length, c.n_kv_heads, head_dim).transpose(1, 2)
            k, v = block.kv_cache.update(positions, k, v)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            attended = block.attn.proj(attended.transpose(1, 2).reshape(batch, length, c.dim))
            x = x + attended + block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        last = F.layer_norm(hidden[:, -1], (self.config.text.dim,), self.text.post_ln.weight, self.text.post_ln.bias)
        return self.text.lm_head(last).float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.text.wte)

    def _prefill(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._decoder(x, mask, positions)

    def _decode_one_tok(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        hidden = self._decoder(x, mask, positions)
        return self._logits(hidden), hidden

    # -- images

    def _vis_enc(self, patches: torch.Tensor) -> torch.Tensor:
        features = self.vision.patch_emb(patches) + self.vision.pos_emb
        return self.vision.proj(F.gelu(features))

    def encode_image(self, image, settings: dict | None = None) -> EncodedImage:
        from PIL import Image

        if isinstance(image, EncodedImage):
            return image
        if not isinstance(image, Image.Image):
            raise ValueError("image must be a PIL Image or EncodedImage")
        if settings is not None and settings["variant"] is not None:  # like the real code: KeyError without it
            raise NotImplementedError("the stand-in has no LoRA variants")
        v = self.config.vision
        pixels = np.asarray(image.convert("RGB").resize((v.crop_size, v.crop_size)), dtype=np.float32) / 127.5 - 1
        side, p = v.crop_size // v.enc_patch_size, v.enc_patch_size
        patches = (
            torch.from_numpy(pixels).reshape(side, p, side, p, 3).permute(0, 2, 1, 3, 4).reshape(1, side * side, -1)
        )
        with torch.inference_mode():
            image_emb = self._vis_enc(patches.to(self.device, torch.bfloat16))  # bfloat16 whatever the weights
            bos = self._embed(torch.tensor([[self.config.tokenizer.bos_id]], device=self.device))
            x = torch.cat([bos, image_emb], dim=1)
            length = x.shape[1]
            self._prefill(x, self.attn_mask[:, :, :length], torch.arange(length, device=self.device))
        caches = [
            (b.kv_cache.k_cache[:, :, :length].clone(), b.kv_cache.v_cache[:, :, :length].clone())
            for b in self.text.blocks
        ]
        return EncodedImage(pos=length, caches=caches)

    def load_encoded_image(self, image: EncodedImage) -> None:
        for block, (k, v) in zip(self.text.blocks, image.caches, strict=False):
            block.kv_cache.k_cache[:, :, : k.shape[2]] = k
            block.kv_cache.v_cache[:, :, : v.shape[2]] = v

    # -- text

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits / temperature, dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[ordered.cumsum(-1) - ordered > top_p] = 0.0
        ordered = ordered / ordered.sum(-1, keepdim=True)
        return order.gather(-1, torch.multinomial(ordered, 1))

    def _prefill_prompt(self, tokens: torch.Tensor, pos: int, temperature: float, top_p: float, mask=None):
        mask = self.attn_mask if mask is None else mask
        with torch.inference_mode():
            x = self._embed(tokens)
            positions = torch.arange(pos, pos + x.shape[1], device=self.device)
            hidden = self._prefill(x, mask[:, :, pos : pos + x.shape[1]], positions)
            logits = self._logits(hidden)
            next_token = self._sample(logits, temperature, top_p)
        return logits, hidden, next_token, pos + x.shape[1]

    def _generate_answer(self, tokens: torch.Tensor, pos: int, settings: dict | None, mask=None):
        settings = settings or {}
        max_tokens = settings.get("max_tokens", DEFAULT_MAX_TOKENS)
        temperature = settings.get("temperature", DEFAULT_TEMPERATURE)
        top_p = settings.get("top_p", DEFAULT_TOP_P)
        ids = self.config.tokenizer
        _, _, next_token, pos = self._prefill_prompt(tokens, pos, temperature, top_p, mask)

        def stream(next_token: torch.Tensor, pos: int):
            seen = torch.zeros(1, 1, self.config.text.max_context, dtype=torch.bool, device=self.device)
            seen[:, :, :pos] = True
            pending: list[int] = []
            sent = 0
            generated = 0
            while (token := int(next_token.item())) != ids.eos_id and generated < max_tokens:
                pending.append(token)
                text = self.tokenizer.decode(pending)
                if text.endswith("\n"):  # a newline flushes everything held
                    if text[sent:]:
                        yield text[sent:]
                    pending, sent = [], 0
                elif text and _is_cjk(text[-1]):
                    if text[sent:]:
                        yield text[sent:]
                    sent = len(text)
                else:  # up to the last space: never half a word
                    space = text.rfind(" ", sent)
                    if space >= sent:
                        yield text[sent : space + 1]
                        sent = space + 1
                with torch.inference_mode():
                    seen[:, :, pos] = True  # IndexError past the context, like the real mask
                    logits, _ = self._decode_one_tok(
                        self._embed(next_token), seen, torch.tensor([pos], device=self.device)
                    )
                    logits[:, ids.answer_id] = float("-inf")
                    pos += 1
                    next_token = self._sample(logits, temperature, top_p)
                    generated += 1
            if pending:
                rest = self.tokenizer.decode(pending)[sent:]
                if rest:
                    yield rest

        return stream(next_token, pos)

    def query(self, image=None, question=None, reasoning=False, spatial_refs=None, stream=False, settings=None):
        if question is None:
            raise ValueError("question must be provided.")
        if reasoning or spatial_refs:
            raise NotImplementedError("the stand-in has no reasoning mode or spatial references")
        template = self.config.tokenizer.templates["query"]
        mask = self.attn_mask
        if image is not None:
            image = self.encode_image(image, settings)
            self.load_encoded_image(image)
            pos, prefix = image.pos, list(template["prefix"])
        else:  # a text-only query replaces the caches and uses a plain causal mask
            self._setup_caches()
            pos, prefix = 0, [self.config.tokenizer.bos_id, *template["prefix"]]
            context = self.config.text.max_context
            mask = torch.ones(1, 1, context, context, dtype=torch.bool, device=self.device).tril()
        ids = prefix + self.tokenizer.encode(question).ids + list(template["suffix"]) * 2  # twice, as the real one

        def answer():  # the prompt is prefilled at the first next(), as in the real code
            yield from self._generate_answer(torch.tensor([ids], device=self.device), pos, settings, mask)

        return {"answer": answer() if stream else "".join(answer())}

    def caption(self, image, length="normal", stream=False, settings=None):
        templates = self.config.tokenizer.templates["caption"]
        if length not in templates:
            raise ValueError(f"Model does not support caption length '{length}'.")
        image = self.encode_image(image, settings)
        self.load_encoded_image(image)
        tokens = torch.tensor([templates[length]], device=self.device)

        def answer():
            yield from self._generate_answer(tokens, image.pos, settings)

        return {"caption": answer() if stream else "".join(answer())}

    # -- grounding

    def _coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.region.coord_decoder(hidden)
        return logits.argmax(-1).float() / logits.shape[-1]

    def _embed_coordinate(self, value: torch.Tensor) -> torch.Tensor:
        features = _fourier(value.reshape(1, 1).to(self.region.coord_features.dtype), self.region.coord_features)
        return self.region.coord_encoder(features)[None]

    def _generate_points(self, hidden, next_token, pos: int, with_size: bool, max_objects: int) -> list[dict]:
        found: list[dict] = []
        seen = torch.zeros(1, 1, self.config.text.max_context, dtype=torch.bool, device=self.device)
        seen[:, :, :pos] = True

        def step(x: torch.Tensor):
            nonlocal pos
            seen[:, :, pos] = True
            logits, out = self._decode_one_tok(x, seen, torch.tensor([pos], device=self.device))
            pos += 1
            return logits, out[:, -1]

        with torch.inference_mode():
            while int(next_token.item()) != self.config.tokenizer.eos_id and len(found) < max_objects:
                x = self._coordinate(hidden)
                _, hidden = step(self._embed_coordinate(x))
                y = self._coordinate(hidden)
                following = self._embed_coordinate(y)
                if with_size:
                    _, hidden = step(following)
                    bins = self.region.size_decoder(hidden).reshape(2, -1).argmax(-1).float()
                    w, h = (2.0 ** ((bins / (self.config.region.size_bins - 1)) * 10.0 - 10.0)).tolist()
                    size = _fourier(
                        torch.tensor([[w, h]], dtype=self.region.size_features.dtype), self.region.size_features
                    )
                    following = self.region.size_encoder(size)[None]
                    cx, cy = x.item(), y.item()
                    found.append({"x_min": cx - w / 2, "y_min": cy - h / 2, "x_max": cx + w / 2, "y_max": cy + h / 2})
                else:
                    found.append({"x": x.item(), "y": y.item()})
                logits, hidden = step(following)
                next_token = logits.argmax(-1)
        return found

    def _locate(self, kind: str, image, what: str, settings: dict | None, with_size: bool) -> list[dict]:
        image = self.encode_image(image, settings)
        self.load_encoded_image(image)
        template = self.config.tokenizer.templates[kind]
        ids = list(template["prefix"]) + self.tokenizer.encode(" " + what).ids + list(template["suffix"])
        _, hidden, next_token, pos = self._prefill_prompt(torch.tensor([ids], device=self.device), image.pos, 0, 0)
        max_objects = (settings or {}).get("max_objects", DEFAULT_MAX_OBJECTS)
        return self._generate_points(hidden[:, -1], next_token, pos, with_size, max_objects)

    def detect(self, image, object, settings=None):  # the real argument name
        return {"objects": self._locate("detect", image, object, settings, with_size=True)}

    def point(self, image, object, settings=None):
        return {"points": self._locate("point", image, object, settings, with_size=False)}


class HfConfig(PretrainedConfig):
    model_type = "moondream1"

    def __init__(self, config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(config or {})


class HfMoondream(PreTrainedModel):
    """The transformers wrapper: like the real one, it never calls ``post_init()``."""

    config_class = HfConfig

    def __init__(self, config: HfConfig):
        super().__init__(config)
        self.model = MoondreamModel(MoondreamConfig.from_dict(config.config), setup_caches=False)
        self._is_kv_cache_setup = False

    def _setup_caches(self) -> None:
        if not self._is_kv_cache_setup:
            self.model._setup_caches()
            self._is_kv_cache_setup = True

    @property
    def encode_image(self):
        self._setup_caches()
        return self.model.encode_image

    @property
    def query(self):
        self._setup_caches()
        return self.model.query

    @property
    def caption(self):
        self._setup_caches()
        return self.model.caption

    @property
    def detect(self):
        self._setup_caches()
        return self.model.detect

    @property
    def point(self):
        self._setup_caches()
        return self.model.point


def randomize(model: HfMoondream, scale: float) -> None:
    """Random weights for the tiny checkpoint (its builder only: ``torch.empty`` is not random)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif name.split(".")[-2].endswith("ln"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, scale / math.sqrt(param.shape[-1]) if param.dim() > 1 else scale)
