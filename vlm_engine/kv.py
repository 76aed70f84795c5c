"""A running batch's key/value cache: merge rows in, drop rows out, trim shared padding.

Rows are left-aligned to a common length: a row's cache entries sit at the right end of
the sequence dimension and ``mask`` marks which positions hold real entries. This is the
layout HF models expect with left padding (TGI's non-flash ``CausalLMBatch`` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class KVBatch:
    """Model-side state of the rows decoding together, in batch order."""

    cache: DynamicCache
    mask: torch.Tensor  # [rows, length] 1 where the cache holds a real entry
    positions: torch.Tensor  # [rows] text position of each row's next token
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row tensors, first dim = rows
    params: list[Any] = field(default_factory=list)  # per-row generation parameters

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(a: KVBatch, b: KVBatch, config: Any) -> KVBatch:
    """Rows of ``a`` then rows of ``b``, left-padded to the longer cache."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    layers = [
        (
            torch.cat([_pad_left(ka, length, 2), _pad_left(kb, length, 2)]),
            torch.cat([_pad_left(va, length, 2), _pad_left(vb, length, 2)]),
        )
        for (ka, va), (kb, vb) in zip(_layers(a.cache), _layers(b.cache), strict=True)
    ]
    mask = torch.cat([_pad_left(a.mask, length, 1), _pad_left(b.mask, length, 1)])
    extra = {k: torch.cat([a.extra[k], b.extra[k]]) for k in a.extra}
    positions = torch.cat([a.positions, b.positions])
    return KVBatch(DynamicCache(layers, config=config), mask, positions, extra, a.params + b.params)


def select(batch: KVBatch, keep: list[int]) -> KVBatch:
    """Only the rows ``keep`` (in that order), without the padding none of them needs."""
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in batch.cache.layers:
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    extra = {k: v[index] for k, v in batch.extra.items()}
    params = [batch.params[i] for i in keep]
    return KVBatch(batch.cache, mask[:, start:], batch.positions[index], extra, params)
