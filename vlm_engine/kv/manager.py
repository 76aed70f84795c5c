"""The KV manager: which pages of the pool each row holds, shared by reference, cached by hash.

- Every page has a reference count. A row holds references to its pages; a full page whose
  contents are known (its **hash**, see ``page_hashes``) is registered and can be shared by
  any later row whose prompt starts the same way (prefix caching), and by the other answers
  of an ``n > 1`` request. Only full pages are shared, so a shared page is never written.
- A page at zero references is free. Free pages without a hash are handed out first; free
  pages with one stay cached (least recently freed handed out first, losing their hash) until
  the pool needs them: "free" means "can be taken", cached or not.
- Page 0 is never handed out (the pool's null page); nothing reads or writes it.
- Pages handed out for new data are listed in ``fresh`` until the runner zeroes them, so a
  slot a row has not written yet never holds a value (NaN from an earlier row) that masked
  attention could pick up.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

ImageRun = tuple[int, int, str]  # [start, end) of one image's tokens in a row, and its content key


@dataclass
class PageStats:
    """Counters for tests, benchmarks and metrics."""

    allocated: int = 0  # pages handed out for new data since start
    freed: int = 0  # references given back
    peak_used: int = 0
    queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0  # ... found there (not prefilled again)
    evicted: int = 0  # cached pages taken for new data


def page_hashes(
    ids: Sequence[int], images: Sequence[ImageRun], page_size: int, start: int = 0, parent: bytes = b""
) -> list[bytes]:
    """Hashes of the full pages of a row's tokens ``ids`` from page ``start`` on (``parent``:
    the hash of page ``start - 1``). A page's hash covers its parent's, its token ids, and the
    content key and offset of every image whose tokens fall in it: image placeholder tokens are
    the same for every image, so the key tells two images apart and the offset one image at
    two places."""
    out = []
    for page in range(start, len(ids) // page_size):
        first, last = page * page_size, (page + 1) * page_size
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(b"".join(i.to_bytes(4, "little", signed=True) for i in ids[first:last]))
        for begin, end, key in images:
            if begin < last and end > first:
                digest.update(f"|{key}@{begin - first}".encode())
        parent = digest.digest()
        out.append(parent)
    return out


class KVManager:
    """``num_pages`` pages of ``page_size`` tokens (page 0 reserved); rows by integer key."""

    def __init__(self, num_pages: int, page_size: int, caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (one is reserved), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.caching = caching
        self.refs = [0] * num_pages
        self.hash_of: list[bytes | None] = [None] * num_pages
        self.by_hash: dict[bytes, int] = {}
        self._clean = list(range(1, num_pages))  # a heap of free pages without a hash: lowest first
        self._cached: OrderedDict[int, None] = OrderedDict()  # free pages with a hash, oldest first
        self._rows: dict[int, list[int]] = {}
        self._registered: dict[int, int] = {}  # per row: how many of its pages are registered
        self.fresh: list[int] = []
        self.stats = PageStats()

    # -- sizes

    @property
    def capacity_tokens(self) -> int:
        """Tokens one row could hold if it had the whole pool."""
        return (self.num_pages - 1) * self.page_size

    @property
    def free_pages(self) -> int:
        """Pages that can be taken: free, or cached at no reference."""
        return len(self._clean) + len(self._cached)

    @property
    def cached_pages(self) -> int:
        return len(self._cached)

    @property
    def used_pages(self) -> int:
        """Pages some row holds."""
        return self.num_pages - 1 - self.free_pages

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def pages(self, key: int) -> list[int]:
        return self._rows.get(key, [])

    def slot(self, key: int, position: int) -> int:
        """The flat slot (page * page_size + offset) of a row's ``position``-th token."""
        return self._rows[key][position // self.page_size] * self.page_size + position % self.page_size

    # -- prefix cache

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of ``hashes`` from the first (a prefix)."""
        if not self.caching:
            return []
        found = []
        for h in hashes:
            page = self.by_hash.get(h)
            if page is None:
                break
            found.append(page)
        return found

    def cost(self, hit: Sequence[int], tokens: int) -> int:
        """Free pages a new row of ``tokens`` tokens takes when it starts with the pages ``hit``:
        the pages it lacks, and the hit pages that nobody holds now (they count as free)."""
        return max(self.pages_for(tokens) - len(hit), 0) + sum(1 for p in hit if self.refs[p] == 0)

    def admit(self, key: int, hit: Sequence[int], tokens: int) -> bool:
        """Start row ``key`` on the shared pages ``hit`` and new pages up to ``tokens`` tokens;
        False (and nothing taken) when the pool is short."""
        if key in self._rows:
            raise ValueError(f"row {key} holds pages already")
        if self.cost(hit, tokens) > self.free_pages:
            return False
        for page in hit:
            self._hold(page)
        self._rows[key] = list(hit)
        self._registered[key] = len(hit)
        self.stats.queried_tokens += tokens
        self.stats.hit_tokens += len(hit) * self.page_size
        return self.grow(key, tokens)

    def register(self, key: int, hashes: Sequence[bytes]) -> None:
        """``hashes``: of the row's full pages from the first; the pages not registered yet are
        (a hash another page already has keeps that page: this one stays private)."""
        if not self.caching:
            return
        pages = self._rows.get(key, [])
        done = self._registered.get(key, 0)
        for index in range(done, min(len(hashes), len(pages))):
            page, h = pages[index], hashes[index]
            if h not in self.by_hash and self.hash_of[page] is None:
                self.by_hash[h] = page
                self.hash_of[page] = h
        self._registered[key] = max(done, min(len(hashes), len(pages)))

    # -- pages of a row

    def grow(self, key: int, tokens: int) -> bool:
        """Give ``key`` pages for ``tokens`` tokens in all; False (and nothing taken) if short."""
        held = self._rows.setdefault(key, [])
        self._registered.setdefault(key, 0)
        missing = self.pages_for(tokens) - len(held)
        if missing <= 0:
            return True
        if missing > self.free_pages:
            if not held:
                self._forget(key)
            return False
        for _ in range(missing):
            page = self._take()
            self.refs[page] = 1
            held.append(page)
            self.fresh.append(page)
        self.stats.allocated += missing
        self.stats.peak_used = max(self.stats.peak_used, self.used_pages)
        return True

    def free(self, key: int) -> int:
        """Give back every reference of ``key`` (last page first); returns how many."""
        held = self._rows.get(key, [])
        for page in reversed(held):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if self.hash_of[page] is not None:
                    self._cached[page] = None  # the most recently freed: evicted last
                else:
                    heapq.heappush(self._clean, page)
        self.stats.freed += len(held)
        self._forget(key)
        return len(held)

    def take_fresh(self) -> list[int]:
        """Pages handed out for new data since the last call (the runner zeroes them)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def _forget(self, key: int) -> None:
        self._rows.pop(key, None)
        self._registered.pop(key, None)

    def _hold(self, page: int) -> None:
        if self.refs[page] == 0:
            self._cached.pop(page, None)
        self.refs[page] += 1

    def _take(self) -> int:
        if self._clean:
            return heapq.heappop(self._clean)
        page, _ = self._cached.popitem(last=False)
        self._unhash(page)
        self.stats.evicted += 1
        return page

    def _unhash(self, page: int) -> None:
        h = self.hash_of[page]
        if h is not None and self.by_hash.get(h) == page:
            del self.by_hash[h]
        self.hash_of[page] = None
