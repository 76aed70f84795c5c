"""What a transformers model sees as its KV cache for one forward of the engine.

The engine describes the forward (``Layout``: rows, how many tokens each already has in the
pool, how many it adds); ``StepCache.update`` writes the new K/V of each layer into the
rows' pages and hands attention each row's K/V; ``paged_attention`` (registered as the
text model's attention implementation) applies the per-row mask of the layout. Outside a
forward of the engine it is plain SDPA, so ``generate`` still works on the same model.
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
_active = threading.local()


@dataclass
class Layout:
    """One forward: ``slots`` to write (``[rows * q]``), ``pages`` to read (``[rows, P]``),
    ``mask`` ``[rows, 1, q, P * page_size]`` (True: attend), real tokens written/read."""

    slots: torch.Tensor
    pages: torch.Tensor
    mask: torch.Tensor
    written: int
    read: int


def layout(pool: KVPool, keys: list[int], cached: list[int], new: list[int], device: Any) -> Layout:
    """Rows ``keys`` with ``cached[r]`` tokens in the pool add ``new[r]`` tokens each, left-padded
    to the longest ``new``. Their pages must already hold ``cached + new`` tokens."""
    table, size = pool.pages, pool.page_size
    q = max(new)
    held = [table.pages(key) for key in keys]
    width = max(table.pages_for(c + n) for c, n in zip(cached, new, strict=True))
    pages = torch.tensor([h[:width] + [0] * (width - len(h[:width])) for h in held], dtype=torch.long)
    start = torch.tensor(cached)[:, None]
    pad = torch.tensor([q - n for n in new])[:, None]
    offset = torch.arange(q)[None, :] - pad  # the query's index among the row's new tokens
    position = (start + offset).clamp(min=0)  # its position in the row
    slots = pages.gather(1, position // size) * size + position % size
    slots = slots.masked_fill(offset < 0, 0)  # padding writes to the reserved page 0
    limit = position.masked_fill(offset < 0, 0)  # padding queries see the row's first token only
    mask = torch.arange(width * size)[None, None, :] <= limit[:, :, None]
    written = sum(new)
    read = sum(c + n for c, n in zip(cached, new, strict=True))
    return Layout(slots.reshape(-1).to(device), pages.to(device), mask[:, None].to(device), written, read)


class StepCache(Cache):
    """The model's cache argument for one forward over the pool (see ``Layout``)."""

    def __init__(self, pool: KVPool, step: Layout, seen: int):
        super().__init__(layers=[])
        self.pool, self.step, self.seen = pool, step, seen

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        k, v = self.pool.write_read(layer_idx, key_states, value_states, self.step.slots, self.step.pages)
        gathered = 2 * k.numel() * k.element_size()
        counters = self.pool.counters
        counters.gathered += gathered
        counters.largest_gather = max(counters.largest_gather, gathered)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0 during a prefill (models then take their image inputs), else 1."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.step.mask.shape[-1], 0

    @property
    def is_compileable(self) -> bool:
        return False


class forward_over:
    """``with forward_over(pool, step):`` the model's attention uses ``step``'s mask on this thread."""

    def __init__(self, pool: KVPool, step: Layout):
        self.pool, self.step = pool, step

    def __enter__(self) -> Layout:
        _active.step = self.step
        return self.step

    def __exit__(self, *exc: object) -> None:
        _active.step = None
        counters, step = self.pool.counters, self.step
        counters.written += step.written * self.pool.shape.bytes_per_token
        counters.attended_tokens += step.mask.shape[0] * step.mask.shape[-1]
        counters.real_tokens += step.read


def paged_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the engine's per-row mask for attention over the pool (inside an engine
    forward), plain SDPA otherwise (Kosmos-2's image-to-text cross attention shares the text
    config: it is recognised by its shapes)."""
    step = getattr(_active, "step", None)
    if step is not None and key.shape[-2] == step.mask.shape[-1] and query.shape[-2] == step.mask.shape[-2]:
        attention_mask = step.mask
        kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, paged_attention)
