"""The persistent batch: the decode rows' state in tensors allocated once, changed by difference.

A row that starts decoding takes the next free slot: its block table, length, next position
(one row of positions, or four for Qwen3-VL's text + M-RoPE), last token and sampling settings
(temperature, top_p) are written there once; a row that leaves is replaced by the last slot's
row (one row copied). Each step then only appends the pages a row grew by, and after the
forward advances every row in place (the chosen tokens become the next inputs without a trip
through the host; lengths and positions grow by one). A decode step's inputs are views of
these tensors: no per-row Python work, no tensor built from lists, on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class PersistentBatch:
    def __init__(self, capacity: int, max_pages: int, position_rows: int, page_size: int, device: Any):
        self.capacity, self.page_size = capacity, page_size
        self.tables = torch.zeros(capacity, max_pages, dtype=torch.long, device=device)
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)  # tokens in the pool
        self.positions = torch.zeros(position_rows, capacity, dtype=torch.long, device=device)  # of the next token
        self.tokens = torch.zeros(capacity, dtype=torch.long, device=device)  # the next token (last chosen)
        self.sampling = torch.zeros(capacity, 2, device=device)  # each row's temperature and top_p
        self.keys: list[int] = []  # the row in each slot
        self.known: list[int] = []  # table entries written per slot
        self.slot_of: dict[int, int] = {}
        self.joined = self.left = 0  # rows written in, rows taken out (tests, benchmarks)

    @property
    def size(self) -> int:
        return len(self.keys)

    def update(
        self,
        rows: Sequence[Any],
        pages: Callable[[int], list[int]],
        next_positions: Callable[[Any], list[int]],
    ) -> list[int]:
        """Make the batch hold exactly ``rows`` (sequences: ``key``, ``cached``, ``last``, ``params``);
        returns each row's slot. Rows already in keep their slot and only get their new pages."""
        wanted = {row.key for row in rows}
        for key in [key for key in self.keys if key not in wanted]:
            self._remove(key)
        for row in rows:
            slot = self.slot_of.get(row.key)
            if slot is None:
                self._add(row, pages(row.key), next_positions(row))
                continue
            held = pages(row.key)
            if len(held) > self.tables.shape[1]:
                self._grow(self.capacity, 2 * len(held))
            if len(held) > self.known[slot]:
                fresh = held[self.known[slot] :]
                self.tables[slot, self.known[slot] : len(held)] = torch.tensor(fresh, dtype=torch.long)
                self.known[slot] = len(held)
        return [self.slot_of[row.key] for row in rows]

    def _add(self, row: Any, held: list[int], positions: list[int]) -> None:
        slot = len(self.keys)
        if slot >= self.capacity or len(held) > self.tables.shape[1]:
            self._grow(max(self.capacity, 2 * slot), max(self.tables.shape[1], 2 * len(held)))
        self.keys.append(row.key)
        self.known.append(len(held))
        self.slot_of[row.key] = slot
        self.tables[slot, : len(held)] = torch.tensor(held, dtype=torch.long)
        self.tables[slot, len(held) :] = held[0]  # padding names the row's own first page: never another row's data
        state = torch.tensor([row.cached, row.last, *positions], dtype=torch.long)
        self.lengths[slot], self.tokens[slot] = state[0], state[1]
        self.positions[:, slot] = state[2:]
        self.sampling[slot] = torch.tensor([row.params.temperature, row.params.top_p])
        self.joined += 1

    def _grow(self, capacity: int, max_pages: int) -> None:
        """More rows or longer rows than sized for (n > 1 answers beyond MAX_RUNNING): the
        tensors are allocated again, larger, with what they hold."""
        n, width = self.capacity, self.tables.shape[1]
        tables = self.tables.new_zeros(capacity, max_pages)
        tables[:n, :width] = self.tables
        tables[:n, width:] = self.tables[:, :1]  # padding: each row's own first page
        self.tables = tables
        for name in ("lengths", "tokens", "sampling"):
            old = getattr(self, name)
            grown = old.new_zeros(capacity, *old.shape[1:])
            grown[:n] = old
            setattr(self, name, grown)
        positions = self.positions.new_zeros(self.positions.shape[0], capacity)
        positions[:, :n] = self.positions
        self.positions, self.capacity = positions, capacity

    def _remove(self, key: int) -> None:
        slot, last = self.slot_of.pop(key), len(self.keys) - 1
        if slot != last:  # the last row moves into the hole
            moved = self.keys[last]
            self.tables[slot] = self.tables[last]
            self.lengths[slot], self.tokens[slot] = self.lengths[last], self.tokens[last]
            self.positions[:, slot] = self.positions[:, last]
            self.sampling[slot] = self.sampling[last]
            self.keys[slot], self.known[slot] = moved, self.known[last]
            self.slot_of[moved] = slot
        self.keys.pop()
        self.known.pop()
        self.left += 1

    def width(self) -> int:
        """Table entries the longest row uses."""
        return max(self.known, default=1)

    def slots(self) -> torch.Tensor:
        """Where each row's next token goes in the pool (page * page_size + offset)."""
        n, size = self.size, self.page_size
        lengths = self.lengths[:n]
        page = self.tables[:n].gather(1, (lengths // size)[:, None])[:, 0]
        return page * size + lengths % size

    def advance(self, chosen: torch.Tensor) -> None:
        """After a forward over the batch: ``chosen`` (a token per row, in slot order) are the
        next inputs; every row holds one more token."""
        n = self.size
        self.tokens[:n].copy_(chosen)
        self.lengths[:n] += 1
        self.positions[:, :n] += 1
