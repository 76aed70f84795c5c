"""Vision-encoder outputs kept by image content (the encoder cache).

An image's encoder output (one row per image token; Qwen3-VL adds its DeepStack rows) is kept
under the image's content key, least recently used first out, within ``ENCODED_IMAGES``
images and ``ENCODER_CACHE_MB`` bytes: the same image in a later request (a chat's next turn,
another question, another row of the same step) is not encoded again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

Encoded = tuple[Any, ...]  # tensors with one row per image token


def _size(encoded: Encoded) -> int:
    return sum(part.numel() * part.element_size() for part in encoded)


class EncoderCache:
    def __init__(self, max_images: int, max_bytes: int):
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, Encoded] = OrderedDict()
        self.bytes = 0
        self.encoded = 0  # images run through the vision encoder
        self.hits = 0  # images whose output came from here

    def __contains__(self, key: str) -> bool:
        return key in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, key: str) -> Encoded:
        """A kept output (a hit: it becomes the most recently used)."""
        self._kept.move_to_end(key)
        self.hits += 1
        return self._kept[key]

    def keep(self, key: str, encoded: Encoded) -> None:
        """Kept unless the cache is off or ``encoded`` alone is over the byte bound; the least
        recently used go until both bounds hold."""
        self.encoded += 1
        size = _size(encoded)
        if self.max_images <= 0 or size > self.max_bytes:
            return
        self._kept[key] = encoded
        self.bytes += size
        while len(self._kept) > self.max_images or self.bytes > self.max_bytes:
            _, dropped = self._kept.popitem(last=False)
            self.bytes -= _size(dropped)

    def clear(self) -> None:
        self._kept.clear()
        self.bytes = 0
