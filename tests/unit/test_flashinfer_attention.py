"""The flashinfer path (``vlm_engine.kv.flashinfer_attention``) on this machine, without CUDA.

flashinfer runs on CUDA only, so its kernels are stood in for by ``FakeFlashInfer``: its two
wrappers take the calls of flashinfer 0.7.0's ``BatchDecodeWithPagedKVCacheWrapper`` and
``BatchPrefillWithPagedKVCacheWrapper`` (``plan`` with the page table as int32 host arrays,
``run(q, (k_cache, v_cache))`` over NHD pages) and compute what flashinfer's documentation
says they compute (``reference``: each row over its pages, the causal mask aligned to the
keys' end). What is checked here is everything of ours around the kernels: the layouts the
runner plans from the KV manager's pages, one plan a step for every layer, the split between
decode rows and chunks. ``make gpu-check`` compares flashinfer's own answers with the gather
path's on a GPU.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from tests.unit.test_scheduler import Request, make_engine, prepare
from vlm_engine.kv import flashinfer_attention as fa
from vlm_engine.kv.cache import DecodeRows, _attend, pack
from vlm_engine.kv.pool import KVPool, KVShape

SIZE = 4  # tokens a page


class _Wrapper:
    """What both of flashinfer's paged wrappers share: plans recorded, ``reference`` run."""

    plans: list[dict]
    runs: int

    def run(self, q: torch.Tensor, paged_kv_cache: tuple[torch.Tensor, torch.Tensor], *args, out=None, **options):
        plan = self.plans[-1]
        assert not args and out is None
        assert q.shape == (plan["layout"].queries, plan["heads"], plan["dim"]) and q.dtype == plan["q_data_type"]
        for cache in paged_kv_cache:  # NHD pages as planned
            assert cache.shape[1:] == (plan["page"], plan["kv_heads"], plan["dim"])
            assert cache.dtype == plan["kv_data_type"]
        self.runs += 1
        return fa.reference(q, *paged_kv_cache, plan["layout"], plan["sm_scale"])

    def _record(self, qo, kv, indices, last, heads, kv_heads, dim, page_size, options) -> None:
        for array in (qo, kv, indices, last):
            assert array.dtype == torch.int32 and array.device.type == "cpu"
        assert heads % kv_heads == 0
        plan = {"layout": fa.Layout(qo, kv, indices, last), "heads": heads, "kv_heads": kv_heads, "dim": dim}
        self.plans.append({**plan, "page": page_size, **options})


# the parameters of flashinfer 0.7.0.post1's wrappers (flashinfer/decode.py, flashinfer/prefill.py),
# keyword-only where flashinfer takes them by name: a misspelt or misplaced argument is a TypeError here too
class _Decode(_Wrapper):
    def __init__(
        self,
        float_workspace_buffer,
        kv_layout="NHD",
        use_cuda_graph=False,
        use_tensor_cores=False,
        paged_kv_indptr_buffer=None,
        paged_kv_indices_buffer=None,
        paged_kv_last_page_len_buffer=None,
        backend="auto",
        jit_args=None,
    ):
        assert kv_layout == "NHD" and float_workspace_buffer.dtype == torch.uint8
        self.plans, self.runs = [], 0

    def plan(
        self,
        indptr,
        indices,
        last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim,
        page_size,
        *,
        pos_encoding_mode="NONE",
        window_left=-1,
        logits_soft_cap=None,
        q_data_type="float16",
        kv_data_type=None,
        o_data_type=None,
        data_type=None,
        sm_scale=None,
        rope_scale=None,
        rope_theta=None,
        non_blocking=True,
        block_tables=None,
        seq_lens=None,
        fixed_split_size=None,
        disable_split_kv=False,
        q_len_per_req=None,
    ):
        qo = torch.arange(len(last_page_len) + 1, dtype=torch.int32)  # one query a row
        options = {"q_data_type": q_data_type, "kv_data_type": kv_data_type, "sm_scale": sm_scale}
        self._record(qo, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, options)


class _Prefill(_Wrapper):
    def __init__(
        self,
        float_workspace_buffer,
        kv_layout="NHD",
        use_cuda_graph=False,
        qo_indptr_buf=None,
        paged_kv_indptr_buf=None,
        paged_kv_indices_buf=None,
        paged_kv_last_page_len_buf=None,
        custom_mask_buf=None,
        mask_indptr_buf=None,
        backend="auto",
        jit_args=None,
        jit_kwargs=None,
        variant_owns_mask=False,
    ):
        assert kv_layout == "NHD" and float_workspace_buffer.dtype == torch.uint8
        self.plans, self.runs = [], 0

    def plan(
        self,
        qo_indptr,
        paged_kv_indptr,
        paged_kv_indices,
        paged_kv_last_page_len,
        num_qo_heads,
        num_kv_heads,
        head_dim_qk,
        page_size,
        head_dim_vo=None,
        custom_mask=None,
        packed_custom_mask=None,
        causal=False,
        pos_encoding_mode="NONE",
        use_fp16_qk_reduction=False,
        sm_scale=None,
        window_left=-1,
        logits_soft_cap=None,
        rope_scale=None,
        rope_theta=None,
        q_data_type="float16",
        kv_data_type=None,
        o_data_type=None,
        non_blocking=True,
    ):
        assert causal is True and custom_mask is None
        options = {"q_data_type": q_data_type, "kv_data_type": kv_data_type, "sm_scale": sm_scale}
        indices, last = paged_kv_indices, paged_kv_last_page_len
        self._record(
            qo_indptr, paged_kv_indptr, indices, last, num_qo_heads, num_kv_heads, head_dim_qk, page_size, options
        )


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = _Decode
    module.BatchPrefillWithPagedKVCacheWrapper = _Prefill
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(fa, "WORKSPACE_BYTES", 64)
    return module


def test_a_layout_lists_each_rows_used_pages_and_how_full_the_last_is():
    plan = fa.layout([([7, 3, 9], 9, 1), ([2, 5], 8, 1), ([4, 6], 5, 5)], SIZE)
    assert plan.qo_indptr.tolist() == [0, 1, 2, 7]
    assert plan.kv_indptr.tolist() == [0, 3, 5, 7]
    assert plan.indices.tolist() == [7, 3, 9, 2, 5, 4, 6]
    assert plan.last_page_len.tolist() == [1, 4, 1]  # 9 = 4 + 4 + 1; 8 fills its pages; 5 = 4 + 1
    with pytest.raises(ValueError, match="cannot have 3 queries"):
        fa.layout([([1], 2, 3)], SIZE)
    with pytest.raises(ValueError, match="in 1 pages"):
        fa.layout([([1], 5, 1)], SIZE)  # 5 tokens need 2 pages


def test_flashinfer_serves_only_half_precision_on_cuda(fake_flashinfer):
    assert fa.usable("cuda:0", torch.bfloat16) and fa.usable("cuda", torch.float16)
    assert not fa.usable("cuda:0", torch.float32)  # flashinfer has no float32 kernels
    assert not fa.usable("cpu", torch.bfloat16)
    assert not fa.usable("cuda:0", torch.bfloat16, "gather")  # PAGED_ATTENTION=gather


def test_the_planned_step_answers_as_the_gather_path_for_every_kind_of_row(fake_flashinfer):
    """Decode rows (one ending mid-page, one filling its page, one longer), a chunk that starts
    its row and one that continues a row over its cached pages, grouped-query heads, two
    layers: the planned path equals ``_attend``'s gather path, planned once for the step."""
    torch.manual_seed(0)
    heads, kv_heads, dim, layers = 4, 2, 8, 2
    decodes = [(0, 6), (1, 7), (2, 12)]  # (row, tokens cached): each writes one more
    chunks = [(3, 0, 5), (4, 9, 14)]  # (row, start, end)
    results = {}
    for path in ("gather", "paged"):
        pool = KVPool(KVShape(layers, kv_heads, dim, torch.float32), 40, SIZE, "cpu")
        for row, cached in decodes:
            assert pool.pages.admit(row, [], cached + 1)
        for row, _, end in chunks:
            assert pool.pages.admit(row, [], end)
        generator = torch.Generator().manual_seed(1)
        for tensor in (*pool.keys, *pool.values):  # every slot: what earlier steps wrote
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
        pages = pool.pages.pages
        width = max(len(pages(row)) for row, _ in decodes)
        table = torch.tensor([pages(r) + [pages(r)[0]] * (width - len(pages(r))) for r, _ in decodes])
        lengths = torch.tensor([cached + 1 for _, cached in decodes])
        slots = torch.tensor([pool.pages.slot(row, cached) for row, cached in decodes])
        rows = DecodeRows(slots, table, lengths, int(lengths.sum()), in_place=False)
        step = pack(pool, rows, chunks, "cpu", gathers=path == "gather")
        if path == "paged":
            kernels = fa.FlashInferAttention("cpu", SIZE, torch.float32)
            step.paged = kernels.step(
                fa.layout([(pages(r), c + 1, 1) for r, c in decodes], SIZE),
                fa.layout([(pages(r), end, end - start) for r, start, end in chunks], SIZE),
            )
        total = len(decodes) + sum(end - start for _, start, end in chunks)
        outputs = []
        for layer in range(layers):
            q = torch.randn(1, heads, total, dim, generator=generator)
            k, v = (torch.randn(1, kv_heads, total, dim, generator=generator) for _ in range(2))
            outputs.append(_attend(step, layer, dim**-0.5, q, k, v)[0])
        results[path] = torch.stack(outputs)
        if path == "paged":
            assert len(kernels.decode.plans) == len(kernels.prefill.plans) == 1, "one plan a step"
            assert kernels.decode.runs == kernels.prefill.runs == layers
            assert kernels.decode.plans[0]["sm_scale"] == dim**-0.5
            assert kernels.prefill.plans[0]["q_data_type"] == torch.float32
            assert step.chunks[1].mask is None and pool.counters.gathered == 0
    assert torch.allclose(results["paged"], results["gather"], atol=1e-5), (
        (results["paged"] - results["gather"]).abs().max()
    )


def test_the_engine_on_the_planned_path_answers_as_on_the_gather_path(tiny_models_dir, fake_flashinfer, monkeypatch):
    """The engine end to end through the runner's flashinfer plan (rows joining and leaving,
    prompts in chunks beside decode rows): the same greedy answers as the gather path."""
    monkeypatch.setattr(fa, "usable", lambda device, dtype, setting="auto": setting != "gather")
    engines = {
        name: make_engine(tiny_models_dir, "llava", WARMUP="false", PAGED_ATTENTION=name, PREFILL_BUDGET="64")
        for name in ("auto", "gather")
    }
    try:
        assert engines["auto"].adapter.runner.paged is not None and engines["gather"].adapter.runner.paged is None
        answers = {}
        for name, engine in engines.items():
            requests = []
            for i in range(4):
                requests.append(Request(engine, prepare(engine, i, 10 + 5 * i)))
                requests[-1].first_text()
            answers[name] = [r.result().text for r in requests]
        assert answers["auto"] == answers["gather"] and all(answers["auto"])
        kernels = engines["auto"].adapter.runner.paged
        assert kernels.decode.runs and kernels.prefill.runs, "both kernels ran"
    finally:
        for engine in engines.values():
            engine.close()


def test_gpu_check_reports_the_flashinfer_path_beside_the_gather_one(
    tiny_models_dir, fake_flashinfer, monkeypatch, tmp_path
):
    """``make gpu-check`` says which attention read the pages and, with flashinfer, runs the same
    rows on the gather path (here with the stand-in kernels, in float32: they must agree)."""
    from benchmarks import gpu_check

    monkeypatch.setattr(fa, "usable", lambda device, dtype, setting="auto": setting != "gather")
    out = tmp_path / "gpu_check.json"
    argv = ["--device", "cpu", "--scale", "tiny", "--models", "llava", "--rows", "1", "4", "--generate-rows"]
    argv += ["--agreement-rows", "4", "--max-tokens", "16", "--tiny-dir", str(tiny_models_dir)]
    argv += ["--work", str(tmp_path / "work"), "--out", str(out)]
    assert gpu_check.main(argv) == 0
    [report] = json.loads(out.read_text())["models"]
    assert report["attention"] == "flashinfer"
    gather = report["gather"]
    assert gather["agreement_with_flashinfer"] == {"rows": 4, "exact_rows": 4, "mean_shared_prefix": 1.0}
    assert gather["throughput"]["rows"] == 4 and gather["throughput"]["output_tokens"] == 16 * 4


def test_kernels_that_cannot_run_leave_the_engine_on_the_gather_path(
    tiny_models_dir, fake_flashinfer, monkeypatch, caplog
):
    """flashinfer compiles its kernels at first use (it needs nvcc): they are built and run once
    while the model loads, and where they fail the engine gathers pages instead of failing."""

    def cannot(self, *args, **kwargs):
        raise RuntimeError("Could not find nvcc")

    monkeypatch.setattr(fa, "usable", lambda device, dtype, setting="auto": True)
    monkeypatch.setattr(_Prefill, "run", cannot)
    engine = make_engine(tiny_models_dir, "llava", WARMUP="false")
    try:
        assert engine.adapter.runner.paged is None
        assert "flashinfer's kernels do not run here (RuntimeError: Could not find nvcc)" in caplog.text
        answer = Request(engine, prepare(engine, 0, 6)).result()
        assert answer.text
    finally:
        engine.close()
