"""The engine's KV memory: a pool of pages allocated once, admission by free pages,
preemption instead of failure, chunked prefill, rows that fail alone."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.unit.test_scheduler import MODELS, Request, make_engine, prepare
from vlm_engine.chat import single_turn
from vlm_engine.errors import EngineError, TooLarge
from vlm_engine.kv.manager import KVManager, page_hashes
from vlm_engine.tiny.samples import PROMPTS

PAGED = [m for m in MODELS if m != "moondream2"]  # moondream2 keeps its own per-row buffers


def test_the_kv_manager_hands_out_lowest_pages_and_takes_them_back():
    table = KVManager(num_pages=9, page_size=4)
    assert table.capacity_tokens == 32 and table.free_pages == 8
    assert table.grow(1, 5) and table.pages(1) == [1, 2]  # page 0 is never handed out
    assert table.grow(2, 4) and table.pages(2) == [3]
    assert table.grow(1, 8) and table.pages(1) == [1, 2]  # already held
    assert not table.grow(3, 40) and table.pages(3) == [] and table.free_pages == 5  # nothing taken
    assert table.slot(1, 5) == 2 * 4 + 1
    assert table.free(1) == 2 and table.grow(4, 1) and table.pages(4) == [1]
    assert table.take_fresh() == [1, 2, 3, 1] and table.take_fresh() == []  # each hand-out, to be zeroed


def test_pages_are_shared_by_reference_and_cached_by_hash_until_the_pool_needs_them():
    table = KVManager(num_pages=7, page_size=4)
    ids = list(range(100, 111))  # 11 tokens: 2 full pages and a partial one
    hashes = page_hashes(ids, [], 4)
    assert len(hashes) == 2 and hashes == page_hashes(ids[:8], [], 4)
    assert table.admit(1, table.match(hashes), 11) and table.pages(1) == [1, 2, 3]
    table.register(1, hashes)
    hit = table.match(hashes)
    assert hit == [1, 2]
    assert table.cost(hit, 11) == 1, "a new row starting the same way takes one new page"
    assert table.admit(2, hit, 11) and table.pages(2) == [1, 2, 4]
    assert table.refs[1:5] == [2, 2, 1, 1]
    assert table.stats.hit_tokens == 8
    table.free(1)
    table.free(2)
    assert table.used_pages == 0 and table.cached_pages == 2 and table.free_pages == 6
    assert table.match(hashes) == [1, 2], "freed pages stay cached"
    assert table.cost([1, 2], 11) == 3, "cached pages nobody holds count as free"
    # an image at another place, or another image, is another prompt
    with_image = page_hashes(ids, [(2, 6, "a")], 4)
    assert with_image[0] != hashes[0] and page_hashes(ids, [(2, 6, "b")], 4)[0] != with_image[0]
    assert page_hashes(ids, [(1, 5, "a")], 4)[0] != with_image[0]
    # the pool needs pages: clean ones first, then the least recently freed cached ones (a row's
    # pages are freed last first, so the end of a prefix goes before its start)
    assert table.grow(3, 16) and table.pages(3) == [3, 4, 5, 6]
    assert table.grow(4, 4) and table.pages(4) == [2] and table.stats.evicted == 1
    assert table.match(hashes) == [1], "an evicted page loses its hash, and the chain ends there"
    table.free(3)
    table.free(4)
    assert table.free_pages == 6 and all(r == 0 for r in table.refs)


@pytest.mark.parametrize("model", PAGED)
def test_a_join_writes_only_the_new_rows_and_a_leave_copies_nothing(tiny_models_dir, model):
    engine = make_engine(tiny_models_dir, model, WARMUP="false")
    try:
        adapter, kv = engine.adapter, engine.adapter.kv
        per_token = kv.shape.bytes_per_token
        pointers = [t.data_ptr() for t in kv.keys + kv.values]
        running = [adapter.start(prepare(engine, i, 8), []) for i in range(3)]
        for seq in running:
            kv.pages.grow(seq.key, seq.length + 8)
        adapter.prefill([(seq, 0, seq.length) for seq in running])
        for _ in range(3):
            adapter.decode(running)
        longest = max(kv.pages.pages_for(seq.cached) for seq in running) * kv.page_size
        joining = adapter.start(prepare(engine, 5, 8), [])
        kv.pages.grow(joining.key, joining.length + 8)
        before = kv.counters.written
        adapter.prefill([(joining, 0, joining.length)])
        assert kv.counters.written - before == joining.length * per_token, "a join writes the new row only"
        before, gathered = kv.counters.written, kv.counters.largest_gather
        adapter.free(running.pop(1))  # a leave: its pages go back, no other row moves
        assert kv.counters.written == before
        adapter.decode([*running, joining])
        assert kv.counters.written - before == 3 * per_token, "a step writes one token per row"
        assert [t.data_ptr() for t in kv.keys + kv.values] == pointers, "the pool is never reallocated"
        # the only transient KV memory of a forward is one layer's K/V of its rows, read for
        # attention (the SDPA path reads each row up to the longest row's pages)
        assert gathered <= 3 * longest * per_token / kv.shape.layers
    finally:
        engine.close()


SMALL_CACHE_MB = {"llava": "2", "kosmos2": "2", "qwen3-vl": "1"}  # room for 2 to 4 of the 8 rows


def _engines_with_small_cache(tiny_models_dir, model: str):
    return make_engine(tiny_models_dir, model, KV_CACHE_MB=SMALL_CACHE_MB[model], IGNORE_EOS="true")


@pytest.mark.parametrize("model", PAGED)
def test_rows_preempted_for_lack_of_pages_finish_with_their_solo_answers(tiny_models_dir, model):
    engine = _engines_with_small_cache(tiny_models_dir, model)
    try:
        capacity = engine.adapter.kv.pages.capacity_tokens
        requests = [prepare(engine, i, 200) for i in range(8)]
        assert sum(engine.adapter.prefill_cost(p) + 200 for p in requests) > 1.2 * capacity
        alone = [engine.generate([prepare(engine, i, 200)])[0].text for i in range(8)]
        assert engine.scheduler.stats.preempted == 0
        together = [Request(engine, p) for p in requests]
        assert [r.result().text for r in together] == alone  # also: streamed chunks join to the answer
        assert engine.scheduler.stats.preempted > 0
        assert engine.adapter.kv.pages.used_pages == 0, "every page came back"
    finally:
        engine.close()


def test_a_request_that_can_never_fit_is_refused_with_413_and_what_fits(tiny_models_dir):
    engine = make_engine(tiny_models_dir, "llava", KV_CACHE_MB="1")
    try:
        capacity = engine.adapter.kv.pages.capacity_tokens
        with pytest.raises(TooLarge, match=r"KV cache holds \d+ tokens .*set max_tokens to at most") as refused:
            prepare(engine, 1, capacity)
        assert refused.value.status == 413
        assert Request(engine, prepare(engine, 1, 8)).result().output_tokens >= 1
    finally:
        engine.close()


def _out_of_memory(step, fail_on: set[int], where: str):
    """``step`` failing with OOM on the steps numbered ``fail_on`` among those carrying prompt
    chunks (``where="prefill"``) or decode rows alone (``"decode"``)."""
    calls = {"n": 0}

    def flaky(decodes, chunks):
        if bool(chunks) == (where == "prefill"):
            calls["n"] += 1
            if calls["n"] in fail_on:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return step(decodes, chunks)

    return flaky


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_out_of_memory_preempts_and_every_row_finishes(tiny_models_dir, monkeypatch, where):
    engine = make_engine(tiny_models_dir, "llava", IGNORE_EOS="true")
    try:
        alone = [engine.generate([prepare(engine, i, 30)])[0].text for i in range(4)]
        monkeypatch.setattr(engine.adapter, "step", _out_of_memory(engine.adapter.step, {2, 3}, where))
        first = Request(engine, prepare(engine, 0, 30))
        first.first_text()
        rest = [Request(engine, prepare(engine, i, 30)) for i in (1, 2, 3)]
        assert [r.result().text for r in [first, *rest]] == alone
        assert engine.scheduler.stats.out_of_memory == 2
        assert engine.adapter.kv.pages.used_pages == 0
    finally:
        engine.close()


def test_a_row_with_non_finite_scores_fails_alone(tiny_models_dir, monkeypatch):
    engine = make_engine(tiny_models_dir, "llava")
    try:
        expected = [engine.generate([prepare(engine, i, 12)])[0].text for i in (0, 2)]
        doomed = prepare(engine, 1, 12, temperature=1.0)  # sampled: torch.multinomial would raise
        choose = engine.adapter.runner.choose

        def poisoned(logits, seqs, settings=None):
            for i, seq in enumerate(seqs):
                if seq.params is doomed.params:
                    logits[i] = float("nan")
            return choose(logits, seqs, settings)

        monkeypatch.setattr(engine.adapter.runner, "choose", poisoned)
        requests = [Request(engine, p) for p in (prepare(engine, 0, 12), doomed, prepare(engine, 2, 12))]
        with pytest.raises(EngineError, match="non-finite"):
            requests[1].result()
        assert [requests[0].result().text, requests[2].result().text] == expected
    finally:
        engine.close()


def test_a_long_prompt_is_prefilled_in_chunks_while_a_stream_keeps_its_pace(tiny_models_dir):
    budget = 64
    engine = make_engine(
        tiny_models_dir, "llava", PREFILL_BUDGET=str(budget), IGNORE_EOS="true", MAX_PROMPT_TOKENS="4000"
    )
    try:
        expected = engine.generate([prepare(engine, 1, 150)])[0].text
        stream = Request(engine, prepare(engine, 1, 150))
        stream.first_text()
        long_prompt = engine.prepare(single_turn(" ".join(PROMPTS * 12), None), 4, 0.0)
        assert long_prompt.prompt_tokens > 8 * budget
        turns_before = len(engine.scheduler.stats.turns)
        long = Request(engine, long_prompt)
        long.result()
        assert stream.result().text == expected
        turns = engine.scheduler.stats.turns[turns_before:]
        chunked = [t for t in turns if t[0] > 0]
        assert len(chunked) >= long_prompt.prompt_tokens // budget, "the prompt came in over several turns"
        # the bound: between two tokens of the stream, at most PREFILL_BUDGET prompt tokens are prefilled
        assert all(prefill <= budget and decoded >= 1 for prefill, decoded in chunked)
    finally:
        engine.close()


def test_qwen_images_are_scaled_to_max_image_tokens(tiny_models_dir):
    from tests.conftest import image_bytes

    capped = make_engine(tiny_models_dir, "qwen3-vl", MAX_IMAGE_TOKENS="16", WARMUP="false")
    free = make_engine(tiny_models_dir, "qwen3-vl", WARMUP="false")
    try:
        big = image_bytes((640, 480))
        tokens = {}
        for name, engine in (("capped", capped), ("free", free)):
            prepared = engine.prepare(single_turn("What is it?", big), 4)
            tokens[name] = int(
                engine.adapter.image_mask({"mm_token_type_ids": prepared.inputs["mm_token_type_ids"][0]}).sum()
            )
        assert tokens["capped"] <= 16 < tokens["free"]
    finally:
        capped.close(), free.close()


def test_a_fatal_device_error_calls_on_fatal_and_fails_the_rows(tiny_models_dir, monkeypatch):
    seen: list[BaseException] = []
    engine = make_engine(tiny_models_dir, "llava")
    engine.scheduler.on_fatal = seen.append
    try:
        step = engine.adapter.step

        def broken(decodes, chunks):
            if decodes:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return step(decodes, chunks)

        monkeypatch.setattr(engine.adapter, "step", broken)
        with pytest.raises(EngineError, match="illegal memory access"):
            Request(engine, prepare(engine, 0, 8)).result()
        assert len(seen) == 1
    finally:
        engine.close()


@pytest.mark.parametrize("model", PAGED)
def test_a_join_peaks_within_1_1x_of_the_live_cache_and_the_new_row(tiny_models_dir, model):
    """Peak KV memory of a join: the live rows' pages, the new row's pages, and the only
    transient the join makes (one layer's K/V of the joining row, read for attention)."""
    engine = make_engine(tiny_models_dir, model, WARMUP="false", MAX_RUNNING="12")
    try:
        adapter, kv = engine.adapter, engine.adapter.kv
        per_token = kv.shape.bytes_per_token
        running = [adapter.start(prepare(engine, i % 8, 8), []) for i in range(8)]
        for seq in running:
            kv.pages.grow(seq.key, seq.length + 8)
        adapter.prefill([(seq, 0, seq.length) for seq in running])
        adapter.decode(running)
        live = sum(seq.cached for seq in running) * per_token
        joining = adapter.start(prepare(engine, 3, 8), [])
        kv.pages.grow(joining.key, joining.length + 8)
        kv.counters.largest_gather = 0
        half = adapter.chunk_end(joining, 0, joining.length // 2)
        adapter.prefill([(joining, 0, half)])
        assert kv.counters.largest_gather == 0, "a prompt's first chunk reads nothing from the pool"
        if half < joining.length:  # its next chunk reads the first from its pages
            adapter.prefill([(joining, half, joining.length)])
            assert kv.counters.largest_gather > 0, "the counter must see the join's read"
        resident = live + joining.length * per_token
        assert (resident + kv.counters.largest_gather) / resident <= 1.1
    finally:
        engine.close()


def test_qwen_reuses_an_encoded_image_by_its_content(tiny_models_dir):
    """The same image again (a new question, or a preempted row prefilled again) skips the
    vision tower, and the answer is the one the tower would give."""
    # the prompt cache off: with it, a repeated prompt's image pages are shared and no tower runs
    plain = {"WARMUP": "false", "IGNORE_EOS": "true", "PREFIX_CACHING": "false"}
    cached = make_engine(tiny_models_dir, "qwen3-vl", **plain)
    uncached = make_engine(tiny_models_dir, "qwen3-vl", ENCODED_IMAGES="0", **plain)
    try:
        answers = {}
        for name, engine in (("cached", cached), ("uncached", uncached)):
            first = engine.generate([prepare(engine, 2, 12)])[0].text
            again = engine.generate([prepare(engine, 2, 12), prepare(engine, 4, 12)])
            answers[name] = [first, *(r.text for r in again)]
        assert cached.adapter.vision_encoded == 2, "image 2 went through the tower once, image 4 once"
        assert uncached.adapter.vision_encoded == 3
        assert answers["cached"] == answers["uncached"]
        assert answers["cached"][0] == answers["cached"][1]
    finally:
        cached.close(), uncached.close()


@pytest.mark.parametrize("model", PAGED)
def test_a_row_gets_the_answer_of_the_models_own_generate(tiny_models_dir, model):
    """The paged cache, explicit positions (M-RoPE, Kosmos-2's offsets) and encoded-image inputs
    give the tokens that transformers' ``generate`` gives for the same request."""
    engine = make_engine(tiny_models_dir, model, WARMUP="false")
    try:
        adapter, answered = engine.adapter, 0
        for i in (1, 2, 5):
            prepared = prepare(engine, i, 16)
            ours = engine.generate([prepared])[0].text
            inputs = adapter.encode([prepared])
            with torch.inference_mode():
                out = adapter.model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=adapter.pad_id)
            new = out[0, inputs["input_ids"].shape[-1] :].tolist()
            reference = adapter.visible_text(
                [t for t in new[: next((k for k, t in enumerate(new) if t in adapter.eos), 16)]]
            )
            assert ours == reference
            answered += bool(ours)
        assert answered >= 2, "most answers must have text, or the comparison proves little"
    finally:
        engine.close()


def test_a_cpu_pool_takes_at_most_a_quarter_of_the_memory_available(monkeypatch):
    """Every row at full length (the CPU default) may be far more than the machine has: the
    pool is capped at a quarter of what is available, unless KV_CACHE_MB says otherwise."""
    from vlm_engine.kv import pool

    monkeypatch.setattr(pool, "available_memory", lambda: 8 * 2**30)
    assert pool.budget_bytes(None, 0.9, "cpu", 64 * 2**30) == 2 * 2**30
    assert pool.budget_bytes(None, 0.9, "cpu", 2**30) == 2**30, "a default that fits is kept"
    assert pool.budget_bytes(40_000, 0.9, "cpu", 2**30) == 40_000 * 2**20, "KV_CACHE_MB beats the cap"


def test_qwen3_vls_patch_embedding_as_a_product_equals_its_conv3d(tiny_models_dir):
    """The engine computes Qwen3-VL's patch embedding as one matrix product; it equals the
    checkpoint's ``Conv3d`` on real processor output (float rounding apart)."""
    from vlm_engine.adapters.qwen3_vl import patch_embedding_as_product

    engine = make_engine(tiny_models_dir, "qwen3-vl", WARMUP="false")
    try:
        embed = engine.adapter.model.model.visual.patch_embed
        assert "forward" in vars(embed), "the engine's model computes the embedding as a product"
        pixels = prepare(engine, 1, 4).inputs["pixel_values"]
        with torch.inference_mode():
            ours = embed(pixels)
            conv = type(embed).forward(embed, pixels)  # the checkpoint's own Conv3d
        assert ours.shape == conv.shape and ours.abs().max() > 0
        torch.testing.assert_close(ours, conv, rtol=1e-5, atol=1e-5)
        other = copy.deepcopy(embed)
        torch.nn.init.normal_(other.proj.weight)
        patch_embedding_as_product(other)
        with torch.inference_mode():
            assert not torch.allclose(other(pixels), ours), "the product reads the module's own weights"
    finally:
        engine.close()


def test_qwen_positions_are_made_with_the_inputs_not_in_the_step_loop(tiny_models_dir):
    """M-RoPE's index (a Python walk of the prompt) is made by ``encode_row``, where the
    request's inputs are made; the step loop computes it only for a row without it."""
    from vlm_engine.adapters.base import PROMPT_POSITIONS

    engine = make_engine(tiny_models_dir, "qwen3-vl", WARMUP="false", IGNORE_EOS="true")
    try:
        made = [prepare(engine, i, 6) for i in range(3)]
        bare = [prepare(engine, i, 6) for i in range(3)]
        assert all(PROMPT_POSITIONS in p.inputs for p in made)
        for prepared in bare:
            del prepared.inputs[PROMPT_POSITIONS]
        adapter, walks = engine.adapter, []
        walk = adapter.sequence_positions
        adapter.sequence_positions = lambda inputs: walks.append(1) or walk(inputs)
        answers = [r.text for r in engine.generate(made)]
        assert walks == [], "the loop did not walk the prompts"
        assert [r.text for r in engine.generate(bare)] == answers
        assert len(walks) == 3, "without them the loop walks each prompt, to the same answers"
    finally:
        engine.close()


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="a kernel without huge pages")
def test_the_cpu_pool_is_zeroed_and_offered_huge_pages():
    """Decode attention jumps from page to page of the pool: its memory is advised huge pages
    (the ``hg`` flag of the mapping that holds it), and still reads as zeros."""
    from vlm_engine.kv.pool import HUGE_PAGE, KVPool, KVShape

    shape = KVShape(layers=2, kv_heads=4, head_dim=32, dtype=torch.float32)
    pool = KVPool(shape, num_pages=1024, page_size=16, device="cpu")
    for tensor in (*pool.keys, *pool.values):
        assert not tensor.any()
        inside = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # an address in the advised part
        assert "hg" in _vm_flags(inside), hex(inside)


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
