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
from transformers.cache_utils import DynamicLayer

HEADROOM = 64  # positions allocated ahead, so most decode steps append in place


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into a buffer with room to the right.

    ``DynamicLayer`` concatenates the whole cache at every step (a full copy per token);
    here a step writes one position in place and ``keys``/``values`` are views of the
    buffer. The buffer grows by ``HEADROOM`` positions when full.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.length = 0
        if keys is not None:
            self.lazy_initialization(keys, values)
            self._store(keys, values)

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = keys.shape[-2]
        shape = (*keys.shape[:-2], length + HEADROOM, keys.shape[-1])
        self._keys = keys.new_empty(shape)
        self._values = values.new_empty((*values.shape[:-2], length + HEADROOM, values.shape[-1]))
        self._keys[..., :length, :] = keys
        self._values[..., :length, :] = values
        self._set(length)

    def _set(self, length: int) -> None:
        self.length = length
        self.keys = self._keys[..., :length, :]
        self.values = self._values[..., :length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._store(key_states, value_states)
            return self.keys, self.values
        new = key_states.shape[-2]
        if self.length + new > self._keys.shape[-2]:
            self._store(self.keys, self.values)
        self._keys[..., self.length : self.length + new, :] = key_states
        self._values[..., self.length : self.length + new, :] = value_states
        self._set(self.length + new)
        return self.keys, self.values


def new_cache(config: Any, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers are ``GrowingLayer``s."""
    cache = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = GrowingLayer(*layers[index]) if layers else GrowingLayer()
        elif layers:
            layer.update(*layers[index])
    return cache


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
    return KVBatch(new_cache(config, layers), mask, positions, extra, a.params + b.params)


def select(batch: KVBatch, keep: list[int], config: Any) -> KVBatch:
    """Only the rows ``keep`` (in that order), without the padding none of them needs."""
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    layers = [(layer.keys[index, :, start:], layer.values[index, :, start:]) for layer in batch.cache.layers]
    cache = new_cache(config, layers)
    extra = {k: v[index] for k, v in batch.extra.items()}
    params = [batch.params[i] for i in keep]
    return KVBatch(cache, mask[:, start:], batch.positions[index], extra, params)
