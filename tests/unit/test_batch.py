"""The persistent batch: rows join and leave by difference, and its tensors always say what
the KV manager and the rows say (block tables, next slots, lengths, positions, tokens,
sampling settings)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vlm_engine.batch import PersistentBatch
from vlm_engine.kv.manager import KVManager

PAGE = 4


def row(manager: KVManager, key: int, tokens: int, last: int) -> SimpleNamespace:
    assert manager.grow(key, tokens + 1)
    params = SimpleNamespace(temperature=key / 10, top_p=1 - key / 100)
    return SimpleNamespace(key=key, cached=tokens, last=last, params=params)


def agrees(batch: PersistentBatch, manager: KVManager, rows: list[SimpleNamespace]) -> None:
    slots = batch.update(rows, manager.pages, lambda r: [100 + r.cached, 7])
    by_slot = sorted(zip(slots, rows, strict=True), key=lambda pair: pair[0])
    assert [slot for slot, _ in by_slot] == list(range(len(rows))), "rows fill slots 0..n-1"
    ordered = [r for _, r in by_slot]
    assert batch.slots().tolist() == [manager.slot(r.key, r.cached) for r in ordered]
    assert batch.lengths[: len(rows)].tolist() == [r.cached for r in ordered]
    assert batch.tokens[: len(rows)].tolist() == [r.last for r in ordered]
    expected = torch.tensor([[r.params.temperature, r.params.top_p] for r in ordered])
    assert torch.equal(batch.sampling[: len(rows)], expected), "each row's temperature and top_p"
    for slot, r in by_slot:
        held = manager.pages(r.key)
        table = batch.tables[slot].tolist()
        assert table[: len(held)] == held
        assert set(table[len(held) :]) <= {held[0]}, "padding names the row's own first page"


def test_rows_join_and_leave_by_difference_and_the_tensors_follow():
    manager = KVManager(64, PAGE)
    batch = PersistentBatch(2, 3, 2, PAGE, "cpu")  # small: it grows past its rows and pages
    a, b, c = row(manager, 1, 5, 11), row(manager, 2, 9, 12), row(manager, 3, 2, 13)
    agrees(batch, manager, [a, b, c])
    assert (batch.joined, batch.left) == (3, 0)

    batch.advance(torch.tensor([21, 22, 23]))  # a step: every row holds one more token
    for r, token in zip((a, b, c), (21, 22, 23), strict=True):
        r.cached, r.last = r.cached + 1, token
    assert batch.positions[0, :3].tolist() == [101 + r.cached - 1 for r in (a, b, c)]

    manager.free(b.key)  # b leaves: the last row takes its slot, nothing else is rewritten
    for r in (a, c):
        assert manager.grow(r.key, r.cached + 1)
    agrees(batch, manager, [a, c])
    assert (batch.joined, batch.left) == (3, 1)

    d = row(manager, 4, 30, 14)  # longer than the table was sized for
    for _ in range(6):  # a and d grow page by page; only the new entries are written
        agrees(batch, manager, [c, a, d])
        batch.advance(batch.tokens[:3] + 1)
        for r in (a, c, d):
            r.cached += 1
        ordered = sorted((a, c, d), key=lambda r: batch.slot_of[r.key])
        for r in ordered:
            r.last += 1
            assert manager.grow(r.key, r.cached + 1)
    assert (batch.joined, batch.left) == (4, 1)
