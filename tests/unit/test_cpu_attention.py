"""The CPU decode kernel against plain SDPA over the same keys, gathered: grouped heads,
rows of every length (a partial last page, a single token, lengths that are not a multiple of
the four tokens scored at once), scattered pages, one and two threads (with fewer rows than
threads, rows are split by KV heads), half-precision pools, and head sizes unrolled or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm_engine.kv import cpu_attention


def reference(q, keys, values, table, lengths, scale):
    out = []
    for r, length in enumerate(lengths.tolist()):
        k = keys[table[r]].flatten(0, 1)[:length].float()  # [length, kv_heads, dim]
        v = values[table[r]].flatten(0, 1)[:length].float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[r][:, None].float(), k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dtype"), [(4, 4, torch.float32), (8, 2, torch.float32), (4, 2, torch.bfloat16)]
)
@pytest.mark.parametrize("dim", [32, 128, 48])  # head sizes the kernel unrolls, and one it loops over
def test_the_kernel_equals_sdpa_over_gathered_pages(threads, heads, kv_heads, dtype, dim):
    assert cpu_attention.available(), "the C++ kernel could not be built: is a compiler (g++) installed?"
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads + dim)
    page, pages = 16, 64
    keys = torch.randn(pages, page, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(pages, page, kv_heads, dim, generator=generator).to(dtype)
    lengths = torch.tensor([1, 16, 17, 50, 129])
    width = 9
    order = torch.randperm(pages - 1, generator=generator)[: len(lengths) * width] + 1
    table = order.view(len(lengths), width)  # each row's pages scattered over the pool
    q = torch.randn(len(lengths), heads, dim, generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_attention.paged_decode(q, keys, values, table, lengths, dim**-0.5)
        alone = cpu_attention.paged_decode(q[:1], keys, values, table[:1], lengths[:1], dim**-0.5)
    finally:
        torch.set_num_threads(before)
    expected = reference(q, keys, values, table, lengths, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(alone, expected[:1], atol=tolerance, rtol=tolerance)


def test_slots_past_a_rows_length_are_never_read():
    """NaN beyond each row's length (in its last page and in pages it does not list) changes nothing."""
    page, dim = 16, 32
    keys = torch.randn(8, page, 2, dim)
    values = torch.randn(8, page, 2, dim)
    table, lengths = torch.tensor([[1, 2], [3, 3]]), torch.tensor([20, 5])
    q = torch.randn(2, 4, dim)
    clean = cpu_attention.paged_decode(q, keys, values, table, lengths, 0.2)
    for pool in (keys, values):
        pool[2, 4:] = float("nan")
        pool[3, 5:] = float("nan")
        pool[4:] = float("nan")
    assert torch.equal(cpu_attention.paged_decode(q, keys, values, table, lengths, 0.2), clean)
