"""The KV pool: one key and one value tensor per layer, ``[pages, page_size, kv_heads, head_dim]``,
allocated once; and the budget that sizes it.

A row's tokens live in the pages its ``PageTable`` entry lists. Writing a forward's new
tokens touches only their slots (``index_copy_``); a row leaving frees its pages and
copies nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlm_engine.kv.pages import PageTable

log = logging.getLogger("vlm_engine.kv")


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def kv_shape(text_config: Any, dtype: torch.dtype) -> KVShape:
    """Layers, KV heads and head size of a decoder config (Llama, Qwen3, Kosmos-2 names)."""
    layers = getattr(text_config, "num_hidden_layers", None) or text_config.layers
    heads = getattr(text_config, "num_attention_heads", None) or text_config.attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    hidden = getattr(text_config, "hidden_size", None) or text_config.embed_dim
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    return KVShape(int(layers), int(kv_heads), int(head_dim), dtype)


@dataclass
class KVCounters:
    """Bytes the KV paths moved, for tests and benchmarks."""

    written: int = 0  # K/V of new tokens written into pages
    gathered: int = 0  # K/V read into attention's working set (the SDPA path)
    largest_gather: int = 0  # the largest one layer's gather (transient memory)
    attended_tokens: int = 0  # key positions attention read, padding included (summed over forwards)
    real_tokens: int = 0  # key positions the rows really have
    copied: int = 0  # K/V copied from one row's pages to another's (n > 1: a shared prompt)


class KVPool:
    def __init__(self, shape: KVShape, num_pages: int, page_size: int, device: str | torch.device):
        self.shape = shape
        self.page_size = page_size
        self.pages = PageTable(num_pages, page_size)
        size = (num_pages, page_size, shape.kv_heads, shape.head_dim)
        # zeroed once: masked slots must hold finite values (0 * NaN would poison attention)
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.counters = KVCounters()

    @property
    def bytes(self) -> int:
        return self.pages.num_pages * self.page_size * self.shape.bytes_per_token

    def write_read(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, read_pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys``/``values`` ``[rows, kv_heads, q, head_dim]`` into ``slots`` (``[rows * q]``,
        padding to slot 0), then each row's K/V over ``read_pages`` ``[rows, pages]`` as
        ``[rows, kv_heads, pages * page_size, head_dim]``."""
        rows, heads, _, dim = keys.shape
        for pool, new in ((self.keys[layer], keys), (self.values[layer], values)):
            pool.view(-1, heads, dim).index_copy_(0, slots, new.transpose(1, 2).reshape(-1, heads, dim))
        k = self.keys[layer][read_pages].view(rows, -1, heads, dim).transpose(1, 2)
        v = self.values[layer][read_pages].view(rows, -1, heads, dim).transpose(1, 2)
        return k, v

    def copy_prefix(self, source: int, target: int, tokens: int) -> None:
        """Copy the K/V of ``source``'s first ``tokens`` tokens into ``target``'s pages (held
        already): whole pages, so the last page's other slots carry garbage that ``target``
        overwrites before it reads them."""
        pages = self.pages.pages_for(tokens)
        src = torch.tensor(self.pages.pages(source)[:pages], device=self.keys[0].device)
        dst = torch.tensor(self.pages.pages(target)[:pages], device=self.keys[0].device)
        for layer in range(self.shape.layers):
            self.keys[layer].index_copy_(0, dst, self.keys[layer].index_select(0, src))
            self.values[layer].index_copy_(0, dst, self.values[layer].index_select(0, src))
        self.counters.copied += pages * self.page_size * self.shape.bytes_per_token


def budget_bytes(kv_cache_mb: int | None, memory_fraction: float, device: str, fallback: int) -> int:
    """KV bytes to allocate: ``KV_CACHE_MB`` when set; on CUDA, ``memory_fraction`` of the
    device less what is in use at its peak so far (weights, warm-up activations); on CPU
    ``fallback`` (enough for MAX_RUNNING rows at full length)."""
    if kv_cache_mb:
        return kv_cache_mb * 2**20
    if str(device).startswith("cuda"):
        index = torch.device(device).index or 0
        _, total = torch.cuda.mem_get_info(index)
        peak = torch.cuda.max_memory_allocated(index)
        available = int(total * memory_fraction) - peak
        if available <= 0:
            raise MemoryError(
                f"no memory left for the KV cache on {device}: {peak / 2**30:.1f} GiB in use at peak of "
                f"{total / 2**30:.1f} GiB (GPU_MEMORY_UTILIZATION={memory_fraction}); raise it or use a smaller model"
            )
        return available
    return fallback
