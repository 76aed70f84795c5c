"""What a transformers model sees as its KV cache for one packed forward of the engine.

A forward carries every row of a step in one flat sequence, without padding: the decode
rows first (one token each), then the prefill chunks (``pack`` builds its ``Step``: the
slot of every new token, each decode row's block table and length, each chunk's place).
``StepCache.update`` marks each layer's new keys; ``paged_attention`` (registered as the
text model's attention implementation) writes the new K/V into the rows' slots and computes
each row's attention over its own pages: the decode rows in one call, a chunk that starts a row on
its own new keys (causal, nothing read from the pool), a chunk that continues a row over its
pages. Which way reads pages is chosen here, in one place (``in_place``): on CPU the decode
rows read their pages in place (``kv.cpu_attention``, the engine's C++ kernel); on CUDA in
float16/bfloat16 every row does, with flashinfer's kernels (``kv.flashinfer_attention``, planned
once a step); chunks that continue a row on CPU, and every row where no kernel exists, gather
the pages per layer for SDPA.

In a compiled forward (``COMPILE_STEP``) the same work is one custom operator,
``vlm::paged_attention``: opaque to the graph, it writes the pool (which is not one of its
arguments: nothing in the graph reads the pool, so nothing can be reordered around it).

Outside a forward of the engine it is plain SDPA, so ``generate`` still works on the same
model; Kosmos-2's image-to-text attention (which shares the text config) is recognised
because its keys are not the ones this cache was handed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlm_engine.kv.pool import KVPool

ATTENTION = "vlm_paged"
COMPILED_ATTENTION = "vlm_paged_compiled"  # inside a compiled forward: every attention is the engine's
_active = threading.local()


@dataclass
class Chunk:
    """A prefill chunk in the pack: tokens ``[begin, end)`` of the flat sequence; ``pages``
    ``[1, P]`` and ``mask`` ``[1, 1, q, P * page_size]`` when it continues a row (None: it
    starts one, and attends causally over its own keys)."""

    begin: int
    end: int
    pages: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass
class Step:
    """One packed forward: ``slots`` ``[T]`` to write; ``decodes`` rows first, with their
    block table ``[rows, P]`` and either their lengths ``[rows]`` (read in place) or a key
    mask ``[rows, 1, 1, P * page_size]`` (gathered); then ``chunks``."""

    slots: torch.Tensor
    decodes: int
    decode_pages: torch.Tensor | None
    decode_mask: torch.Tensor | None
    chunks: list[Chunk]
    written: int  # tokens written
    read: int  # key positions the rows really have
    attended: int  # key positions attention reads (block tables are padded to the longest row)
    pool: KVPool | None = None
    decode_lengths: torch.Tensor | None = None
    key: Any = None  # the keys ``StepCache.update`` handed on last (tells self-attention apart)
    layer: int = 0
    paged: Any = None  # on CUDA with flashinfer: the step's plan (``kv.flashinfer_attention``), for every row


def in_place(device: Any, setting: str = "auto") -> bool:
    """Whether decode rows read their pages in place (``PAGED_ATTENTION``) on CPU, with the
    engine's kernel (``kv.cpu_attention``, built once per machine). On CUDA every row reads
    them in place where flashinfer is usable (``kv.flashinfer_attention``); otherwise pages are
    gathered per layer for SDPA."""
    if setting == "gather" or not str(device).startswith("cpu"):
        return False
    from vlm_engine.kv import cpu_attention

    return cpu_attention.available()


@dataclass
class DecodeRows:
    """The decode rows of a pack, from the persistent batch (device tensors): each new token's
    ``slots`` ``[rows]``, block ``table`` ``[rows, width]``, ``lengths`` ``[rows]`` with the new
    token; ``tokens``: their sum (on the host); ``in_place``: attention reads pages in place."""

    slots: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor
    tokens: int
    in_place: bool


def pack(
    pool: KVPool, decode: DecodeRows | None, chunks: list[tuple[int, int, int]], device: Any, gathers: bool = True
) -> Step:
    """The ``Step`` of one packed forward: ``decode`` rows first, then ``chunks`` (row key,
    start, end) of prompts. Their pages must be held already. Not ``gathers``: attention reads
    every row's pages in place (flashinfer), so a chunk needs no page list or mask of its own."""
    table, size = pool.pages, pool.page_size
    decode_pages = decode_mask = decode_lengths = None
    read = attended = rows = 0
    slots = []
    if decode is not None:
        rows, decode_pages = len(decode.lengths), decode.table
        slots.append(decode.slots)
        read += decode.tokens
        if decode.in_place:
            decode_lengths = decode.lengths
            attended += decode.tokens
        else:
            width = decode.table.shape[1] * size
            key_positions = torch.arange(width, device=decode.lengths.device)
            decode_mask = (key_positions[None, :] < decode.lengths[:, None])[:, None, None]
            attended += rows * width
    placed: list[Chunk] = []
    begin = rows
    chunk_slots: list[int] = []
    for key, start, end in chunks:
        held = torch.tensor(table.pages(key)[: table.pages_for(end)], dtype=torch.long)
        position = torch.arange(start, end)
        chunk_slots += (held[position // size] * size + position % size).tolist()
        chunk = Chunk(begin, begin + end - start)
        if start > 0:
            if gathers:
                limit = position[:, None]
                chunk.mask = (torch.arange(len(held) * size)[None, :] <= limit)[None, None].to(device)
                chunk.pages = held[None].to(device)
            attended += len(held) * size * (end - start)
        else:
            attended += (end - start) * (end - start + 1) // 2
        read += end
        placed.append(chunk)
        begin = chunk.end
    if chunk_slots:
        slots.append(torch.tensor(chunk_slots, dtype=torch.long).to(device))
    return Step(
        slots[0] if len(slots) == 1 else torch.cat(slots),
        rows,
        decode_pages,
        decode_mask,
        placed,
        begin,
        read,
        attended,
        pool,
        decode_lengths,
    )


class StepCache(Cache):
    """The model's cache argument for one packed forward over the pool (see ``Step``)."""

    def __init__(self, step: Step, seen: int):
        super().__init__(layers=[])
        self.step, self.seen = step, seen

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        """Marks the layer's new keys (attention writes them into the pool, then reads)."""
        self.step.key, self.step.layer = key_states, layer_idx
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0 when the forward carries an image (Kosmos-2 then takes its image inputs), else 1."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False


class forward_over:
    """``with forward_over(pool, step):`` the model's attention reads ``step``'s pages on this thread."""

    def __init__(self, pool: KVPool, step: Step):
        self.pool, self.step = pool, step

    def __enter__(self) -> Step:
        _active.step = self.step
        return self.step

    def __exit__(self, *exc: object) -> None:
        _active.step = None
        counters, step = self.pool.counters, self.step
        counters.written += step.written * self.pool.shape.bytes_per_token
        counters.attended_tokens += step.attended
        counters.real_tokens += step.read


def _attend(step: Step, layer: int, scale: float, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The new tokens' K/V written into their slots, then each row's attention over its own
    tokens; ``query`` ``[1, heads, T, dim]``, ``key``/``value`` the new tokens' ``[1, kv_heads,
    T, dim]``. Returns ``[1, T, heads, dim]``."""
    import torch.nn.functional as F

    pool = step.pool
    pool.write(layer, key[0], value[0], step.slots)
    if step.paged is not None:  # every row reads its pages in place (flashinfer)
        return step.paged.run(query[0].transpose(0, 1), pool.keys[layer], pool.values[layer], scale)[None], None
    q = query[0]
    heads, total, dim = q.shape
    kv_heads = key.shape[1]
    gqa = heads != kv_heads
    out = q.new_empty(total, heads, dim)
    n = step.decodes
    keys, values = pool.keys[layer], pool.values[layer]
    gathered = 0
    if n and step.decode_lengths is not None:
        from vlm_engine.kv.cpu_attention import paged_decode

        out[:n] = paged_decode(q[:, :n].transpose(0, 1), keys, values, step.decode_pages, step.decode_lengths, scale)
    elif n:
        k = keys[step.decode_pages].view(n, -1, kv_heads, dim).transpose(1, 2)
        v = values[step.decode_pages].view(n, -1, kv_heads, dim).transpose(1, 2)
        gathered += 2 * k.numel() * k.element_size()
        o = F.scaled_dot_product_attention(
            q[:, :n].transpose(0, 1)[:, :, None], k, v, attn_mask=step.decode_mask, scale=scale, enable_gqa=gqa
        )
        out[:n] = o[:, :, 0]
    for chunk in step.chunks:
        part = q[:, chunk.begin : chunk.end][None]
        if chunk.pages is None:
            k, v = key[:, :, chunk.begin : chunk.end], value[:, :, chunk.begin : chunk.end]
            o = F.scaled_dot_product_attention(part, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            k = keys[chunk.pages].view(1, -1, kv_heads, dim).transpose(1, 2)
            v = values[chunk.pages].view(1, -1, kv_heads, dim).transpose(1, 2)
            gathered += 2 * k.numel() * k.element_size()
            o = F.scaled_dot_product_attention(part, k, v, attn_mask=chunk.mask, scale=scale, enable_gqa=gqa)
        out[chunk.begin : chunk.end] = o[0].transpose(0, 1)
    counters = pool.counters
    counters.gathered += gathered
    counters.largest_gather = max(counters.largest_gather, gathered)
    return out[None], None


def _scale(module: Any, query: torch.Tensor) -> float:
    scale = getattr(module, "scaling", None)
    return float(scale) if scale is not None else query.shape[-1] ** -0.5


def paged_attention(module, query, key, value, attention_mask, **kwargs):
    """Inside an engine forward, each row's attention over its pages; plain SDPA otherwise."""
    step = getattr(_active, "step", None)
    if step is not None and key is step.key:
        return _attend(step, step.layer, _scale(module, query), query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.library.custom_op("vlm::paged_attention", mutates_args=())
def paged_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    """``_attend`` as one opaque operator for ``torch.compile``: the graph runs up to each
    layer's attention and on after it; inside, the step of this thread (``forward_over``) says
    where the rows' pages are (as vLLM's attention op reads its forward context)."""
    return _attend(_active.step, layer, scale, query, key, value)[0]


@paged_attention_op.register_fake
def _(query, key, value, layer, scale):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def compiled_paged_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention of a compiled engine forward (``COMPILED_ATTENTION``): always the op."""
    return paged_attention_op(query, key, value, module.layer_idx, _scale(module, query)), None


AttentionInterface.register(ATTENTION, paged_attention)
AttentionInterface.register(COMPILED_ATTENTION, compiled_paged_attention)
