"""The KV pool: one key and one value tensor per layer, ``[pages, page_size, kv_heads, head_dim]``,
allocated once; and the budget that sizes it.

A row's tokens live in the pages the ``KVManager`` lists for it (some shared with other
rows, by reference). Writing a forward's new tokens touches only their slots
(``index_copy_``); a row leaving gives its references back and copies nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlm_engine.kv.manager import KVManager

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
    gathered: int = 0  # K/V gathered from pages into attention's working set (the CPU path)
    largest_gather: int = 0  # the largest one layer's gather (transient memory)
    attended_tokens: int = 0  # key positions attention read, padding included (summed over forwards)
    real_tokens: int = 0  # key positions the rows really have
    copied: int = 0  # K/V copied from one page to another (n > 1: the prompt's last, partial page)


HUGE_PAGE = 2 << 20


def _zeros(size: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """A zeroed pool tensor. On a Linux CPU its memory is first offered huge pages
    (``madvise(MADV_HUGEPAGE)``, honoured when transparent huge pages are ``always`` or
    ``madvise``): decode attention jumps from page to page of the pool, and with 4 KiB pages
    each jump missed the TLB (1.04-1.21x on the kernel here, with 16-token pages)."""
    tensor = torch.empty(size, dtype=dtype, device=device)
    if tensor.device.type == "cpu" and tensor.numel():
        _advise_huge_pages(tensor)
    return tensor.zero_()


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 14)  # MADV_HUGEPAGE
    except (OSError, AttributeError):  # no libc madvise: 4 KiB pages, as before
        pass


class KVPool:
    def __init__(
        self, shape: KVShape, num_pages: int, page_size: int, device: str | torch.device, caching: bool = True
    ):
        self.shape = shape
        self.page_size = page_size
        self.pages = KVManager(num_pages, page_size, caching)
        size = (num_pages, page_size, shape.kv_heads, shape.head_dim)
        # zeroed once: masked slots must hold finite values (0 * NaN would poison attention)
        self.keys = [_zeros(size, shape.dtype, device) for _ in range(shape.layers)]
        self.values = [_zeros(size, shape.dtype, device) for _ in range(shape.layers)]
        self.counters = KVCounters()

    @property
    def bytes(self) -> int:
        return self.pages.num_pages * self.page_size * self.shape.bytes_per_token

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[kv_heads, T, head_dim]`` of a forward's T new tokens into
        their ``slots`` ``[T]`` (page * page_size + offset)."""
        heads, _, dim = keys.shape
        self.keys[layer].view(-1, heads, dim).index_copy_(0, slots, keys.transpose(0, 1))
        self.values[layer].view(-1, heads, dim).index_copy_(0, slots, values.transpose(0, 1))

    def copy_page(self, source: int, target: int) -> None:
        """Copy page ``source`` into ``target`` (a row's own page, handed out for it): pages
        waiting to be zeroed are zeroed first, so the copy is not undone."""
        self.scrub(self.pages.take_fresh())
        for pool in (*self.keys, *self.values):
            pool[target].copy_(pool[source])
        self.counters.copied += self.page_size * self.shape.bytes_per_token

    def scrub(self, pages: list[int]) -> None:
        """Zero ``pages`` (handed out for new data): a slot a row has not written yet holds 0,
        never a value an earlier row left (a NaN there would reach masked attention)."""
        if not pages:
            return
        index = torch.tensor(pages, device=self.keys[0].device)
        for pool in (*self.keys, *self.values):
            pool.index_fill_(0, index, 0)


CPU_MEMORY_SHARE = 0.25  # of the memory available at start, the most a CPU pool takes unless KV_CACHE_MB says


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux), if it says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def budget_bytes(kv_cache_mb: int | None, memory_fraction: float, device: str, fallback: int) -> int:
    """KV bytes to allocate: ``KV_CACHE_MB`` when set; on CUDA, ``memory_fraction`` of the
    device less what is in use at its peak so far (weights, warm-up activations); on CPU
    ``fallback`` (enough for MAX_RUNNING rows at full length), but no more than
    ``CPU_MEMORY_SHARE`` of the memory available now (rows are rarely all full length: the
    scheduler preempts when they are)."""
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
    free = available_memory()
    if free is not None and fallback > CPU_MEMORY_SHARE * free:
        log.warning(
            "the KV cache for every row at full length would take %.1f GiB; it takes %.1f GiB (%d%% of the "
            "memory available); set KV_CACHE_MB to choose",
            fallback / 2**30,
            CPU_MEMORY_SHARE * free / 2**30,
            CPU_MEMORY_SHARE * 100,
        )
        return int(CPU_MEMORY_SHARE * free)
    return fallback
