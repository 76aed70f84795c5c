"""The page table: which pages of the KV pool each row holds.

Page 0 is never handed out: padding positions write there, so a padded forward never
touches a row's pages. Pages are handed out lowest first, so the used part of the pool
stays compact.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class PageStats:
    """Counters for tests and benchmarks."""

    allocated: int = 0  # pages handed out since start
    freed: int = 0
    peak_used: int = 0


class PageTable:
    """``num_pages`` pages of ``page_size`` tokens (page 0 reserved); rows by integer key."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(1, num_pages))  # a heap: lowest page first
        self._rows: dict[int, list[int]] = {}
        self.stats = PageStats()

    @property
    def capacity_tokens(self) -> int:
        """Tokens one row could hold if it had the whole pool."""
        return (self.num_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def pages(self, key: int) -> list[int]:
        return self._rows.get(key, [])

    def held_tokens(self, key: int) -> int:
        return len(self.pages(key)) * self.page_size

    def can_grow(self, key: int, tokens: int, keep_free: int = 0) -> bool:
        """Whether ``key`` could hold ``tokens`` tokens with ``keep_free`` pages left over."""
        missing = self.pages_for(tokens) - len(self.pages(key))
        return missing <= 0 or missing + keep_free <= len(self._free)

    def grow(self, key: int, tokens: int) -> bool:
        """Give ``key`` pages for ``tokens`` tokens in all; False (and nothing taken) if short."""
        held = self._rows.setdefault(key, [])
        missing = self.pages_for(tokens) - len(held)
        if missing <= 0:
            return True
        if missing > len(self._free):
            if not held:
                del self._rows[key]
            return False
        held.extend(heapq.heappop(self._free) for _ in range(missing))
        self.stats.allocated += missing
        self.stats.peak_used = max(self.stats.peak_used, self.used_pages)
        return True

    def free(self, key: int) -> int:
        """Give back every page of ``key``; returns how many."""
        held = self._rows.pop(key, [])
        for page in held:
            heapq.heappush(self._free, page)
        self.stats.freed += len(held)
        return len(held)

    def slot(self, key: int, position: int) -> int:
        """The flat slot (page * page_size + offset) of a row's ``position``-th token."""
        return self._rows[key][position // self.page_size] * self.page_size + position % self.page_size
