"""Paged attention on CUDA with flashinfer: every row of a step reads its pages in place.

The pool's per-layer tensors ``[pages, page_size, kv_heads, head_dim]`` are flashinfer's
``NHD`` paged layout as they are. A step is planned once on the host (``Layout``: for each row
its queries, the pages it uses and how full its last page is) and every layer then runs two
kernels over the same plan: flashinfer's batch decode for the decode rows (one query each)
and its batch prefill for the prompt chunks (a chunk's queries are the last tokens of its
row, so flashinfer's causal mask, aligned to the end of the keys, is the chunk's own: a query
sees every earlier token of its row and itself). The new tokens' K/V are in the pool before
attention runs (``kv.cache._attend`` writes them first), so a chunk that starts a row reads
its own pages like any other.

flashinfer computes in float16 or bfloat16 only; float32 (tests, CPU) keeps the gather path.
``reference`` computes what the two kernels compute, from the same ``Layout``, with SDPA: the
CPU tests check the layouts against the gather path with it, and ``make gpu-check`` checks
flashinfer's answers against the gather path's on a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("vlm_engine.kv")
WORKSPACE_BYTES = 128 * 2**20  # flashinfer's split-k scratch, as its documentation advises
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """Rows of one kernel call, flashinfer's arrays (int32, on the host): queries of row *i* are
    ``qo_indptr[i]:qo_indptr[i+1]`` of the call's queries; its pages ``indices[kv_indptr[i]:
    kv_indptr[i+1]]``, the last of them holding ``last_page_len[i]`` tokens."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    indices: torch.Tensor
    last_page_len: torch.Tensor

    @property
    def rows(self) -> int:
        return len(self.last_page_len)

    @property
    def queries(self) -> int:
        return int(self.qo_indptr[-1])


def layout(rows: list[tuple[list[int], int, int]], page_size: int) -> Layout:
    """``rows``: (the row's pages, its tokens in the pool once this step's are written, its
    queries this step: the last ones of those tokens)."""
    qo, kv, indices, last = [0], [0], [], []
    for pages, length, queries in rows:
        used = -(-length // page_size)
        if queries < 1 or queries > length or used > len(pages):
            raise ValueError(f"a row of {length} tokens in {len(pages)} pages cannot have {queries} queries")
        indices += pages[:used]
        kv.append(kv[-1] + used)
        last.append(length - (used - 1) * page_size)
        qo.append(qo[-1] + queries)

    def int32(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32)

    return Layout(int32(qo), int32(kv), int32(indices), int32(last))


def reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Layout, scale: float
) -> torch.Tensor:
    """What flashinfer's kernels compute for ``plan``, with SDPA: ``query`` ``[T, heads, dim]``,
    ``keys``/``values`` one layer's pool; each row's queries see its keys up to their own place
    (the causal mask aligned to the keys' end). Returns ``[T, heads, dim]``."""
    import torch.nn.functional as F

    heads, kv_heads = query.shape[1], keys.shape[2]
    size = keys.shape[1]
    out = torch.empty_like(query)
    for i in range(plan.rows):
        q0, q1 = int(plan.qo_indptr[i]), int(plan.qo_indptr[i + 1])
        pages = plan.indices[int(plan.kv_indptr[i]) : int(plan.kv_indptr[i + 1])].long().to(keys.device)
        length = (len(pages) - 1) * size + int(plan.last_page_len[i])
        k = keys[pages].flatten(0, 1)[:length].transpose(0, 1)  # [kv_heads, length, dim]
        v = values[pages].flatten(0, 1)[:length].transpose(0, 1)
        q = query[q0:q1].transpose(0, 1)  # [heads, queries, dim]
        visible = torch.arange(length, device=query.device)[None, :] <= (
            torch.arange(q1 - q0, device=query.device)[:, None] + length - (q1 - q0)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=heads != kv_heads)
        out[q0:q1] = o.transpose(0, 1)
    return out


def usable(device: Any, dtype: torch.dtype, setting: str = "auto") -> bool:
    """flashinfer reads the pages (``PAGED_ATTENTION=auto``): on CUDA, in float16 or bfloat16,
    where ``flashinfer`` imports."""
    if setting == "gather" or not str(device).startswith("cuda") or dtype not in DTYPES:
        return False
    try:
        import flashinfer  # noqa: F401
    except Exception as exc:  # not installed, or built for another CUDA: the gather path
        log.info("flashinfer is not usable (%s): attention gathers pages", exc)
        return False
    return True


class FlashInferAttention:
    """flashinfer's two paged kernels over the pool, with their workspace (allocated once)."""

    def __init__(self, device: Any, page_size: int, dtype: torch.dtype):
        import flashinfer

        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # the decode kernel on tensor cores: right for every group size of grouped-query heads
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")

    def step(self, decodes: Layout | None, chunks: Layout | None) -> StepAttention:
        return StepAttention(self, decodes, chunks)

    def works(self, heads: int, kv_heads: int, dim: int) -> bool:
        """Both kernels built (flashinfer compiles them at first use: minutes, with the CUDA
        toolkit's nvcc) and run once on a row of two tokens, before the model reports ready;
        False (and why, in the log) when they cannot: the engine then gathers pages."""
        pages = torch.zeros(2, self.page_size, kv_heads, dim, dtype=self.dtype, device=self.device)
        rows = layout([([0, 1], 2, 1)], self.page_size)
        try:
            step = self.step(rows, layout([([0, 1], 2, 2)], self.page_size))
            query = torch.zeros(3, heads, dim, dtype=self.dtype, device=self.device)
            out = step.run(query, pages, pages, dim**-0.5)
            if out.shape != query.shape:
                raise RuntimeError(f"an output of {tuple(out.shape)} for queries of {tuple(query.shape)}")
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            log.warning("flashinfer's kernels do not run here (%s): attention gathers pages", why)
            return False
        return True


class StepAttention:
    """One step's plan: made at the step's first attention (when the heads and scale are
    known), run by every layer."""

    def __init__(self, kernels: FlashInferAttention, decodes: Layout | None, chunks: Layout | None):
        self.kernels, self.decodes, self.chunks = kernels, decodes, chunks
        self.planned: tuple[int, int, int, float, torch.dtype] | None = None

    def _plan(self, heads: int, kv_heads: int, dim: int, scale: float, dtype: torch.dtype) -> None:
        k = self.kernels
        common = {"q_data_type": dtype, "kv_data_type": k.dtype, "sm_scale": scale}
        if self.decodes is not None:
            d = self.decodes
            k.decode.plan(d.kv_indptr, d.indices, d.last_page_len, heads, kv_heads, dim, k.page_size, **common)
        if self.chunks is not None:
            c = self.chunks
            k.prefill.plan(
                c.qo_indptr,
                c.kv_indptr,
                c.indices,
                c.last_page_len,
                heads,
                kv_heads,
                dim,
                k.page_size,
                causal=True,
                **common,
            )
        self.planned = (heads, kv_heads, dim, scale, dtype)

    def run(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """``query`` ``[T, heads, dim]`` (decode rows first, then the chunks), one layer's pool.
        Planned at the first layer; every layer must have the same heads and scale (planning
        again mid-step would rewrite host buffers earlier layers' kernels may still read)."""
        shape = (query.shape[1], keys.shape[2], query.shape[2], scale, query.dtype)
        if self.planned is None:
            self._plan(*shape)
        elif self.planned != shape:
            raise ValueError(f"a layer of (heads, kv heads, dim, scale, dtype) {shape} in a step planned for another")
        query = query.contiguous()
        n = self.decodes.queries if self.decodes is not None else 0
        out = torch.empty_like(query)
        if n:
            out[:n] = self.kernels.decode.run(query[:n], (keys, values))
        if self.chunks is not None:
            out[n:] = self.kernels.prefill.run(query[n:], (keys, values))
        return out
